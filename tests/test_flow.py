"""Flow control on one process, on SQLite and PostgreSQL: options checked at
registration, queued endpoint runs over HTTP, rate limits, function queues
in priority order, and a queue that drains with no run started twice."""

from __future__ import annotations

import threading
import time
from collections import Counter
from typing import Any

import pytest
import requests
from flask import Flask, jsonify, request

from flask_durable import Durable, step

durable = Durable()
calls: Counter[str] = Counter()
order: list[str] = []
_lock = threading.Lock()


@pytest.fixture
def db_url(any_db_url: str) -> str:
    return any_db_url


@pytest.fixture(autouse=True)
def _reset() -> Any:
    calls.clear()
    order.clear()
    yield
    durable._access.auth = None


def _note(name: str) -> str:
    with _lock:
        calls[name] += 1
        order.append(name)
    return name


def test_options_are_checked_at_registration() -> None:
    d = Durable()
    with pytest.raises(ValueError, match="concurrency must be an integer >= 1"):
        d.endpoint(concurrency=0)(lambda: None)
    with pytest.raises(ValueError, match="callable of the request"):
        d.endpoint(concurrency={"limit": 2, "key": "request.user"})(lambda: None)
    with pytest.raises(ValueError, match="throttle is"):
        d.endpoint(throttle={"limit": 2})(lambda: None)
    with pytest.raises(ValueError, match="rate_limit period"):
        d.endpoint(rate_limit={"limit": 2, "period": "soon"})(lambda: None)
    with pytest.raises(ValueError, match="'f'.*not valid CEL"):
        d.function("f", event="x", concurrency={"limit": 1, "key": "event.data."})(
            lambda e: e
        )
    with pytest.raises(ValueError, match="'g'.*priority is"):
        d.function("g", event="x", priority={"after": "1"})(lambda e: e)
    with pytest.raises(ValueError, match="same key"):
        d.function(
            "h",
            event="x",
            concurrency={"limit": 1, "key": "event.data.a"},
            throttle={"limit": 1, "period": "1s", "key": "event.data.b"},
        )(lambda e: e)


def build(make_app: Any) -> Flask:
    app = make_app(durable, DURABLE_WAIT_TIMEOUT=10)
    gate = threading.Event()
    app.config["gate"] = gate

    @app.post("/one-at-a-time")
    @durable.endpoint(concurrency={"limit": 1, "key": lambda r: r.args["user"]})
    def one_at_a_time() -> Any:
        user = request.args["user"]
        step.run("hold", lambda: user != "ann" or gate.wait(10))
        return jsonify(user=user)

    @app.post("/limited")
    @durable.endpoint(rate_limit={"limit": 2, "period": "1h"})
    def limited() -> Any:
        return jsonify(n=step.run("n", _note, "limited"))

    return app


def test_endpoint_over_its_limit_is_queued(make_app: Any, live_server: Any) -> None:
    app = build(make_app)
    server = live_server(app)
    durable.dashboard_auth(lambda: True)
    gate: threading.Event = app.config["gate"]
    first: dict[str, Any] = {}
    client = threading.Thread(
        target=lambda: first.update(r=server.post("/one-at-a-time?user=ann"))
    )
    client.start()
    try:
        end = time.monotonic() + 10
        while not app.extensions["durable"].active:
            assert time.monotonic() < end
            time.sleep(0.02)
        # Ann's second request waits for her first; Bob's runs at once.
        queued = server.post(
            "/one-at-a-time?user=ann", headers={"Prefer": "respond-async"}
        )
        assert queued.status_code == 202 and queued.json()["status"] == "queued"
        assert queued.headers["Location"].startswith("/durable/wait/")
        other = server.post(
            "/one-at-a-time?user=bob", headers={"Prefer": "respond-async"}
        )
        run_id = queued.headers["Durable-Run-Id"]
        run = server.get(f"/durable/api/runs/{run_id}").json()
        assert run["status"] == "queued" and run["steps"] == []
        usage = server.get("/durable/api/flow").json()["keys"]
        ann = next(u for u in usage if u["key"].endswith("ann"))
        assert (ann["running"], ann["queued"]) == (1, 1)
        page = server.get("/durable/?status=queued")
        assert page.status_code == 200 and run_id in page.text
    finally:
        gate.set()
        client.join(10)
    assert first["r"].status_code == 200
    final = server.get(queued.headers["Location"])
    assert final.status_code == 200 and final.json() == {"user": "ann"}
    assert other.status_code in (200, 202)


def test_rate_limit_answers_429_before_any_step(
    make_app: Any, live_server: Any
) -> None:
    server = live_server(build(make_app))
    answers = [server.post("/limited") for _ in range(4)]
    assert [r.status_code for r in answers] == [200, 200, 429, 429]
    refused = answers[2]
    assert int(refused.headers["Retry-After"]) >= 1
    assert "rate limit" in refused.json()["error"]
    assert "Durable-Run-Id" not in refused.headers
    assert calls["limited"] == 2


def test_function_queue_drains_in_priority_order(make_app: Any) -> None:
    d = Durable()

    @d.function(
        "serial",
        event="job/queued",
        concurrency=1,
        priority={"run": "event.data.boost"},
    )
    def serial(event: dict[str, Any]) -> Any:
        step.run("work", _note, event["data"]["name"])

    app = make_app(d)
    lifecycle = app.extensions["durable"]
    with app.app_context():
        lifecycle.ensure_schema()
        # Stored before any worker runs: admission then follows priority.
        lifecycle.start_functions(
            [
                {
                    "name": "job/queued",
                    "data": {"name": n, "boost": b},
                    "id": n,
                    "ts": 0,
                }
                for n, b in [("a", 0), ("b", 0), ("urgent", 60), ("c", 0)]
            ]
        )
        runs, _ = d.list_runs(status="queued")
        assert len(runs) == 4
        d.start()
    end = time.monotonic() + 20
    while len(order) < 4:
        assert time.monotonic() < end, order
        time.sleep(0.05)
    assert order == ["urgent", "a", "b", "c"]


def test_a_queue_drains_with_no_run_started_twice(make_app: Any) -> None:
    d = Durable()

    @d.function("drain", event="drain/go", concurrency={"limit": 3, "key": "'all'"})
    def drain(event: dict[str, Any]) -> Any:
        step.run("work", _note, event["id"])

    app = make_app(d, DURABLE_WORKERS=4)
    with app.app_context():
        d.start()
        for lo in range(0, 300, 100):
            app.extensions["durable"].send_events(
                [
                    app.extensions["durable"].events.check("drain/go", {}, f"e{i}")
                    for i in range(lo, lo + 100)
                ]
            )
    end = time.monotonic() + 60
    while len(order) < 300:
        assert time.monotonic() < end, len(order)
        time.sleep(0.1)
    time.sleep(0.3)
    assert sorted(calls) == sorted(f"e{i}" for i in range(300))
    assert set(calls.values()) == {1}
    with app.app_context():
        runs, _ = d.list_runs(endpoint="drain", limit=1000)
    assert len(runs) == 300 and {r.status for r in runs} == {"completed"}


def test_usage_needs_access(make_app: Any, live_server: Any) -> None:
    server = live_server(build(make_app))
    assert server.get("/durable/api/flow").status_code == 403
    assert requests.get(server.url + "/durable/api/flow", timeout=5).status_code == 403


def test_cli_shows_usage(make_app: Any) -> None:
    d = Durable()

    @d.function(
        "held", event="held/go", concurrency={"limit": 2, "key": "event.data.k"}
    )
    def held(event: dict[str, Any]) -> Any:
        return None

    app = make_app(d)
    runner = app.test_cli_runner()
    empty = runner.invoke(args=["durable", "flow"])
    assert empty.exit_code == 0 and "no runs under flow-control limits" in empty.output
    with app.app_context():
        app.extensions["durable"].ensure_schema()
        app.extensions["durable"].start_functions(
            [
                {"name": "held/go", "data": {"k": "x"}, "id": f"h{i}", "ts": 0}
                for i in range(3)
            ]
        )
    table = runner.invoke(args=["durable", "flow"])
    assert table.exit_code == 0, table.output
    assert "held / 'x'" in table.output or "held / x" in table.output
    as_json = runner.invoke(args=["durable", "flow", "--json"])
    keys = __import__("json").loads(as_json.output)["keys"]
    assert keys[0]["queued"] == 3 and keys[0]["running"] == 0 and keys[0]["limit"] == 2


def test_debounce_runs_once_with_the_last_event(make_app: Any) -> None:
    d = Durable()

    @d.function(
        "report",
        event="doc/edited",
        # A period long enough for the 21 sends to land inside it on a busy
        # machine.
        debounce={"period": "1500ms", "key": "event.data.doc", "timeout": "1m"},
    )
    def report(event: dict[str, Any]) -> Any:
        _note(f"{event['data']['doc']}:{event['data']['n']}")
        return event["data"]["n"]

    app = make_app(d)
    with app.app_context():
        d.start()
        for n in range(20):
            d.send("doc/edited", {"doc": "a", "n": n})
        d.send("doc/edited", {"doc": "b", "n": 0})
    end = time.monotonic() + 15
    while len(order) < 2:
        assert time.monotonic() < end, order
        time.sleep(0.05)
    time.sleep(1.7)  # a second run of "a" would have started by now
    assert sorted(order) == ["a:19", "b:0"], order
    # After the run started, a new event opens a new pending run.
    with app.app_context():
        d.send("doc/edited", {"doc": "a", "n": 20})
    while len(order) < 3:
        assert time.monotonic() < end, order
        time.sleep(0.05)
    assert order[-1] == "a:20"
    with app.app_context():
        runs, _ = d.list_runs(endpoint="report")
    assert len(runs) == 3 and {r.status for r in runs} == {"completed"}


def test_debounce_timeout_bounds_the_delay(make_app: Any) -> None:
    d = Durable()

    @d.function("t", event="t/go", debounce={"period": "10s", "timeout": "300ms"})
    def t(event: dict[str, Any]) -> Any:
        _note(str(event["data"]["n"]))

    app = make_app(d)
    with app.app_context():
        d.start()
        for n in range(3):
            d.send("t/go", {"n": n})
    end = time.monotonic() + 10
    while not order:
        assert time.monotonic() < end, "the timeout should have started the run"
        time.sleep(0.05)
    assert order == ["2"]


def test_batches_of_events(make_app: Any) -> None:
    d = Durable()
    batches: list[list[int]] = []

    @d.function(
        "batched", event="item/added", batch_events={"max_size": 4, "timeout": "300ms"}
    )
    def batched(events: list[dict[str, Any]]) -> Any:
        numbers = step.run("numbers", lambda: [e["data"]["n"] for e in events])
        with _lock:
            batches.append(numbers)
        return len(numbers)

    app = make_app(d)
    with app.app_context():
        d.start()
        for n in range(10):
            d.send("item/added", {"n": n})
    end = time.monotonic() + 15
    while sum(len(b) for b in batches) < 10:
        assert time.monotonic() < end, batches
        time.sleep(0.05)
    time.sleep(0.4)
    # Two full batches at once, then the last two after the timeout; every
    # event exactly once, in order.
    assert sorted(batches) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    with app.app_context():
        runs, _ = d.list_runs(endpoint="batched")
        outputs = sorted(d.get_run(r.id).output for r in runs)  # type: ignore[union-attr]
    assert outputs == [2, 4, 4]
    with pytest.raises(ValueError, match="batch_events is"):
        d.function("bad", event="x", batch_events={"max_size": 0, "timeout": "1s"})(
            lambda events: None
        )
