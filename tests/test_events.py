"""Sleeping, waiting for events, parallel steps, cancellation and timeouts,
over real HTTP."""

from __future__ import annotations

import threading
import time
from collections import Counter
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
from flask import Flask, jsonify, request

from flask_durable import Durable, StepError, current_run, current_step, step

durable = Durable()


@pytest.fixture
def db_url(any_db_url: str) -> str:
    """Every test here runs on SQLite and on PostgreSQL."""
    return any_db_url


EVENT_KEY = "s3cret-event-key"


def build(make_app: Any, **config: Any) -> tuple[Flask, Counter[str]]:
    config.setdefault("DURABLE_EVENT_KEY", EVENT_KEY)
    app = make_app(**config)
    calls: Counter[str] = Counter()
    fail_once: set[str] = set()

    def count(name: str, value: Any = None) -> Any:
        calls[name] += 1
        return value

    @app.post("/nap")
    @durable.endpoint
    def nap() -> Any:
        started = step.run("start", time.time)
        step.sleep("nap", request.args.get("for", "2s"))
        step.run("after", count, "after")
        return jsonify(slept=time.time() - started, attempt=current_run.attempt)

    @app.post("/nap-until")
    @durable.endpoint
    def nap_until() -> Any:
        at = step.run("at", lambda: datetime.now(timezone.utc) + timedelta(seconds=1))
        step.sleep_until("until", at)
        step.sleep_until("past", "2000-01-01T00:00:00Z")
        return jsonify(woke_after=datetime.now(timezone.utc) >= at)

    @app.post("/bad-sleep")
    @durable.endpoint
    def bad_sleep() -> Any:
        try:
            step.sleep("zzz", "ten minutes")
        except ValueError as e:
            return jsonify(error=str(e)), 400
        return "no"

    @app.post("/approve/<int:booking>")
    @durable.endpoint
    def approve(booking: int) -> Any:
        step.run("reserve", count, "reserve", booking)
        approval = step.wait_for_event(
            "approval",
            event="approval/received",
            match={"data.booking_id": booking},
            timeout=request.args.get("timeout", "20s"),
        )
        if approval is None:
            return jsonify(error="not approved in time"), 408
        step.run("confirm", count, "confirm")
        return jsonify(approval=approval)

    @app.post("/parallel")
    @durable.endpoint
    def parallel() -> Any:
        def slow(name: str) -> str:
            calls[name] += 1
            time.sleep(0.5)
            if name in request.args.getlist("fail") and name not in fail_once:
                fail_once.add(name)
                raise RuntimeError(f"{name} failed")
            return name.upper()

        started = time.monotonic()
        results = step.parallel(
            lambda: step.run("x", slow, "x"),
            lambda: step.run("y", slow, "y"),
            lambda: step.run("z", slow, "z"),
        )
        return jsonify(results=results, took=time.monotonic() - started)

    @app.post("/parallel-fatal")
    @durable.endpoint(retries=0)
    def parallel_fatal() -> Any:
        def boom() -> None:
            raise ValueError("nope")

        try:
            step.parallel(
                lambda: step.run("ok", count, "ok", 1), lambda: step.run("bad", boom)
            )
        except StepError as e:
            return jsonify(failed=e.step_id, ok_calls=calls["ok"]), 500
        return "no"

    gate = threading.Event()
    app.config["gate"] = gate

    @app.post("/slow-steps")
    @durable.endpoint
    def slow_steps() -> Any:
        step.run("one", count, "one")
        gate.wait(10)
        step.run("two", count, "two")
        return jsonify(done=True)

    @app.post("/deadline")
    @durable.endpoint(timeout="1s")
    def deadline() -> Any:
        step.sleep("long", "30s")
        return jsonify(done=True)

    @app.post("/cancel/<run_id>")
    def cancel(run_id: str) -> Any:
        return jsonify(cancelled=durable.cancel(run_id))

    @app.post("/send")
    def send() -> Any:
        body = request.get_json()
        return jsonify(
            id=durable.send(body["name"], body.get("data"), id=body.get("id"))
        )

    return app, calls


def test_sleep_answers_via_wait_url_on_time(make_app: Any, live_server: Any) -> None:
    app, calls = build(make_app)
    server = live_server(app)
    began = time.time()
    r = server.post("/nap?for=2s", allow_redirects=False)
    assert r.status_code == 303
    assert r.json()["status"] == "sleeping"
    run_id = r.headers["Durable-Run-Id"]
    # Nothing is held for the sleeping run in this process.
    assert run_id not in app.extensions["durable"].active
    final = server.get(r.headers["Location"])
    elapsed = time.time() - began
    assert final.status_code == 200
    assert final.json()["slept"] >= 2.0
    assert elapsed >= 2.0
    # Due after 2 s; allowed: DURABLE_POLL_INTERVAL (0.2) + 1 s.
    assert elapsed <= 2.0 + 0.2 + 1.0 + 0.5
    assert calls["after"] == 1


def test_sleep_until_and_past_instants(make_app: Any, live_server: Any) -> None:
    app, _ = build(make_app)
    server = live_server(app)
    r = server.post("/nap-until")
    assert r.status_code == 200
    assert r.json() == {"woke_after": True}
    assert len(r.history) == 1


def test_malformed_duration_is_value_error_naming_step(
    make_app: Any, live_server: Any
) -> None:
    app, _ = build(make_app)
    server = live_server(app)
    r = server.post("/bad-sleep")
    assert r.status_code == 400
    assert "zzz" in r.json()["error"]
    assert "malformed duration" in r.json()["error"]


def _post_event(server: Any, payload: Any, key: str | None = EVENT_KEY) -> Any:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return server.post("/durable/events", json=payload, headers=headers)


def test_approval_flow_resumed_by_event(make_app: Any, live_server: Any) -> None:
    # A short long-poll: the poll below that finds the run still waiting
    # answers after 0.5 s, not the default 10 s.
    app, calls = build(make_app, DURABLE_WAIT_TIMEOUT=0.5)
    server = live_server(app)
    r = server.post("/approve/42", allow_redirects=False)
    assert r.status_code == 303
    assert r.json()["status"] == "waiting"
    location = r.headers["Location"]

    # A non-matching event and an event of another name are ignored.
    assert (
        _post_event(
            server, {"name": "approval/received", "data": {"booking_id": 7}}
        ).status_code
        == 202
    )
    assert (
        _post_event(server, {"name": "other", "data": {"booking_id": 42}}).status_code
        == 202
    )
    pending = server.get(
        location, headers={"Prefer": "respond-async"}, allow_redirects=False
    )
    # Still waiting: neither event matched.
    assert pending.status_code == 202
    assert pending.json() == {"run_id": r.json()["run_id"], "status": "waiting"}
    assert pending.headers["Location"] == location
    assert calls["confirm"] == 0

    sent = _post_event(
        server,
        [
            {
                "name": "approval/received",
                "data": {"booking_id": 42, "by": "ann"},
                "id": "ev-1",
            }
        ],
    )
    assert sent.status_code == 202
    assert sent.json() == {"ids": ["ev-1"]}
    final = server.get(location)
    assert final.status_code == 200
    approval = final.json()["approval"]
    assert approval["name"] == "approval/received"
    assert approval["data"] == {"booking_id": 42, "by": "ann"}
    assert approval["id"] == "ev-1"
    assert isinstance(approval["ts"], int)
    assert calls == Counter(reserve=1, confirm=1)


def test_event_before_wait_began_does_not_match(
    make_app: Any, live_server: Any
) -> None:
    app, _ = build(make_app)
    server = live_server(app)
    _post_event(server, {"name": "approval/received", "data": {"booking_id": 5}})
    r = server.post("/approve/5?timeout=1s")
    assert r.status_code == 408
    assert r.json() == {"error": "not approved in time"}


def test_wait_timeout_returns_none(make_app: Any, live_server: Any) -> None:
    app, calls = build(make_app)
    server = live_server(app)
    began = time.time()
    r = server.post("/approve/9?timeout=1s")
    assert r.status_code == 408
    assert time.time() - began >= 1.0
    assert calls["confirm"] == 0


def test_events_route_auth_and_validation(make_app: Any, live_server: Any) -> None:
    app, _ = build(make_app)
    server = live_server(app)
    ok = {"name": "x"}
    assert _post_event(server, ok, key=None).status_code == 401
    assert _post_event(server, ok, key="wrong").status_code == 401
    bad = server.post(
        "/durable/events",
        data=b"{not json",
        headers={
            "Authorization": f"Bearer {EVENT_KEY}",
            "Content-Type": "application/json",
        },
    )
    assert bad.status_code == 400
    assert "error" in bad.json()
    for payload in (
        {"data": {}},
        {"name": ""},
        {"name": "x", "data": [1]},
        {"name": 3},
        [],
        {"name": "x", "id": 5},
        "text",
    ):
        r = _post_event(server, payload)
        assert r.status_code == 400, payload
        assert "error" in r.json()
    r = _post_event(server, [{"name": "a"}, {"name": "b", "id": "dup"}])
    assert r.status_code == 202
    assert len(r.json()["ids"]) == 2


def test_events_route_is_404_without_key(make_app: Any, live_server: Any) -> None:
    app, _ = build(make_app, DURABLE_EVENT_KEY=None)
    server = live_server(app)
    r = _post_event(server, {"name": "x"})
    assert r.status_code == 404


def test_event_id_deduplicates(make_app: Any, live_server: Any) -> None:
    app, calls = build(make_app)
    server = live_server(app)
    first = server.post("/approve/1", allow_redirects=False)
    second = server.post("/approve/1", allow_redirects=False)
    # The same event id twice: stored and delivered once.
    payload = {"name": "approval/received", "data": {"booking_id": 1}, "id": "same"}
    assert _post_event(server, payload).json() == {"ids": ["same"]}
    assert server.get(first.headers["Location"]).status_code == 200
    assert server.get(second.headers["Location"]).status_code == 200
    third = server.post("/approve/1?timeout=1s", allow_redirects=False)
    _post_event(server, payload)  # duplicate id: ignored, does not resume
    assert server.get(third.headers["Location"]).status_code == 408


def test_parallel_branches_run_concurrently(make_app: Any, live_server: Any) -> None:
    app, calls = build(make_app)
    server = live_server(app)
    r = server.post("/parallel")
    assert r.status_code == 200
    assert r.json()["results"] == ["X", "Y", "Z"]
    assert r.json()["took"] < 1.4  # three 0.5 s steps at once, not in a row
    assert calls == Counter(x=1, y=1, z=1)


def test_parallel_failing_branch_retried_alone(make_app: Any, live_server: Any) -> None:
    app, calls = build(make_app)
    server = live_server(app)
    r = server.post("/parallel?fail=y", allow_redirects=False)
    assert r.status_code == 303
    final = server.get(r.headers["Location"])
    assert final.json()["results"] == ["X", "Y", "Z"]
    assert calls == Counter(x=1, y=2, z=1)


def test_parallel_branch_failing_for_good_raises_step_error(
    make_app: Any, live_server: Any
) -> None:
    app, calls = build(make_app)
    server = live_server(app)
    r = server.post("/parallel-fatal")
    assert r.status_code == 500
    assert r.json() == {"failed": "bad", "ok_calls": 1}


def test_cancel_sleeping_run(make_app: Any, live_server: Any) -> None:
    app, calls = build(make_app)
    server = live_server(app)
    r = server.post("/nap?for=30s", allow_redirects=False)
    run_id = r.headers["Durable-Run-Id"]
    assert server.post(f"/cancel/{run_id}").json() == {"cancelled": True}
    final = server.get(r.headers["Location"])
    assert final.status_code == 409
    assert final.json()["run_id"] == run_id
    assert calls["after"] == 0
    assert server.post(f"/cancel/{run_id}").json() == {"cancelled": False}
    with app.app_context():
        info = durable.get_run(run_id)
    assert info is not None and info.status == "cancelled"


def test_cancel_running_run_stops_at_next_step(make_app: Any, live_server: Any) -> None:
    app, calls = build(make_app)
    server = live_server(app)
    result: dict[str, Any] = {}

    def call() -> None:
        result["r"] = server.post("/slow-steps")

    client = threading.Thread(target=call)
    client.start()
    for _ in range(100):
        if calls["one"]:
            break
        time.sleep(0.05)
    state = app.extensions["durable"]
    run_id = next(iter(state.active))
    assert server.post(f"/cancel/{run_id}").json() == {"cancelled": True}
    app.config["gate"].set()
    client.join(10)
    r = result["r"]
    assert r.status_code == 409
    assert r.json()["run_id"] == run_id
    assert calls["two"] == 0


def test_endpoint_timeout_cancels_with_504(make_app: Any, live_server: Any) -> None:
    app, _ = build(make_app)
    server = live_server(app)
    began = time.time()
    r = server.post("/deadline")
    assert r.status_code == 504
    assert time.time() - began < 10


def test_wait_url_wakes_without_polling_delay(make_app: Any, live_server: Any) -> None:
    app, _ = build(make_app, DURABLE_POLL_INTERVAL=5)
    server = live_server(app)
    r = server.post("/approve/77", allow_redirects=False)
    waited: dict[str, Any] = {}

    def wait() -> None:
        waited["r"] = server.get(r.headers["Location"])
        waited["t"] = time.time()

    waiter = threading.Thread(target=wait)
    waiter.start()
    time.sleep(0.3)
    sent_at = time.time()
    _post_event(server, {"name": "approval/received", "data": {"booking_id": 77}})
    waiter.join(10)
    assert waited["r"].status_code == 200
    # Poll interval is 5 s: a fast answer means the waiter was woken.
    assert waited["t"] - sent_at < 2.5


def test_a_finished_sleep_is_written_with_the_next_checkpoint(
    make_app: Any, live_server: Any
) -> None:
    app = make_app()
    seen: list[str] = []

    def sleep_row_status() -> str:
        # What the database holds for the sleep while the next step runs.
        with app.app_context():
            info = durable.get_run(current_step.run_id)
        assert info is not None
        seen.append({s.id: s.status for s in info.steps}["nap"])
        return "done"

    @app.post("/fold")
    @durable.endpoint
    def fold() -> Any:
        step.run("before", lambda: 1)
        step.sleep("nap", 0.3)
        step.run("after", sleep_row_status)
        step.sleep("short", 0)
        return jsonify(ok=True)

    r = live_server(app).post("/fold")
    assert r.json() == {"ok": True}
    assert r.history[0].status_code == 303
    # The completion of the sleep cost no commit of its own: it was still
    # "sleeping" in the database while "after" ran, then committed with it.
    assert seen == ["sleeping"]
    with app.app_context():
        info = durable.get_run(r.headers["Durable-Run-Id"])
    assert info is not None
    assert [(s.id, s.status) for s in info.steps] == [
        ("before", "completed"),
        ("nap", "completed"),
        ("after", "completed"),
        ("short", "completed"),
    ]
