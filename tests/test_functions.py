"""Durable functions started by events and cron ticks (SPEC 9), on SQLite and
PostgreSQL: matching, filters, fan-out, exactly once per event and per tick,
retries, outputs."""

from __future__ import annotations

import time
from collections import Counter
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
from flask import Flask

from flask_durable import Durable, step
from flask_durable.functions import CronClock, cron_key

calls: Counter[str] = Counter()


@pytest.fixture
def db_url(any_db_url: str) -> str:
    return any_db_url


@pytest.fixture(autouse=True)
def _reset() -> None:
    calls.clear()


def flaky(name: str) -> str:
    calls[name] += 1
    if calls[name] == 1:
        raise ConnectionError("first attempt fails")
    return name


def build(make_app: Any, **config: Any) -> tuple[Durable, Flask]:
    durable = Durable()

    @durable.function("welcome", event="user/signup", if_="event.data.plan == 'pro'")
    def welcome(event: dict[str, Any]) -> Any:
        calls["welcome"] += 1
        name = step.run("flaky", flaky, "welcome-step")
        return {"user": event["data"]["user"], "step": name}

    @durable.function(
        "audit",
        triggers=[{"event": "user/signup"}, {"event": "user/deleted"}],
    )
    def audit(event: dict[str, Any]) -> Any:
        calls["audit:" + event["name"]] += 1
        return None

    @durable.function(
        "once-per-user",
        event="user/signup",
        if_=lambda event: event["data"].get("user") != "nobody",
        idempotency="event.data.user",
    )
    def once(event: dict[str, Any]) -> Any:
        calls["once:" + event["data"]["user"]] += 1
        return event["data"]["user"]

    app = make_app(durable, **config)
    return durable, app


def wait_done(durable: Durable, app: Flask, n: int, timeout: float = 20) -> list[Any]:
    end = time.monotonic() + timeout
    while True:
        with app.app_context():
            runs, _ = durable.list_runs(limit=1000)
        if len(runs) >= n and all(r.is_terminal for r in runs):
            return runs
        assert time.monotonic() < end, [(r.endpoint, r.status) for r in runs]
        time.sleep(0.05)


def test_events_start_the_matching_functions_once(make_app: Any) -> None:
    durable, app = build(make_app)
    with app.app_context():
        durable.start()
        durable.send("user/signup", {"plan": "pro", "user": "ann"}, id="e1")
        durable.send("user/signup", {"plan": "free", "user": "bob"}, id="e2")
        durable.send("user/signup", {"plan": "pro", "user": "ann"}, id="e1")  # again
        durable.send("user/deleted", {"user": "bob"})
        durable.send("user/signup", {"plan": "pro", "user": "ann"}, id="e3")
        durable.send("user/signup", {"plan": "pro", "user": "nobody"}, id="e4")
        durable.send("other/event", {"user": "x"})
    # welcome: e1, e3, e4 (pro); audit: e1, e2, e3, e4, deleted; once: ann,
    # bob (not nobody).
    runs = wait_done(durable, app, 3 + 5 + 2)
    assert Counter(r.endpoint for r in runs) == {
        "welcome": 3,
        "audit": 5,
        "once-per-user": 2,
    }
    assert {r.status for r in runs} == {"completed"}
    assert calls["audit:user/signup"] == 4 and calls["audit:user/deleted"] == 1
    assert calls["once:ann"] == 1 and calls["once:bob"] == 1
    # A step that failed once was retried; the step before stayed memoized.
    assert calls["welcome-step"] == 4  # three runs: one failure, three successes
    with app.app_context():
        welcome = [durable.get_run(r.id) for r in runs if r.endpoint == "welcome"]
    outputs = sorted(w.output["user"] for w in welcome if w is not None)
    assert outputs == ["ann", "ann", "nobody"]
    for info in welcome:
        assert info is not None and info.event is not None
        assert info.event["name"] == "user/signup"
        assert info.event["id"] in {"e1", "e3", "e4"}


def test_function_route_refuses_requests(make_app: Any) -> None:
    _, app = build(make_app)
    r = app.test_client().post("/durable/_functions/welcome", json={"event": {}})
    assert r.status_code == 404


def test_registration_errors_name_the_function(make_app: Any) -> None:
    durable = Durable()
    with pytest.raises(ValueError, match="'bad-cel'.*not valid CEL"):
        durable.function("bad-cel", event="x", if_="event.data ==")(lambda e: e)
    with pytest.raises(ValueError, match="'no-trigger' has no trigger"):
        durable.function("no-trigger")(lambda e: e)
    with pytest.raises(ValueError, match="'bad-cron': bad cron"):
        durable.function("bad-cron", cron="99 * * * *")(lambda e: e)
    with pytest.raises(ValueError, match="'bad-zone': bad cron"):
        durable.function("bad-zone", cron="TZ=Nowhere/Else 0 2 * * *")(lambda e: e)
    with pytest.raises(ValueError, match="function id"):
        durable.function("has space", event="x")(lambda e: e)
    with pytest.raises(ValueError, match="unknown timeouts"):
        durable.function("t", event="x", timeouts={"begin": "1m"})(lambda e: e)
    with pytest.raises(ValueError, match="'c'.*cancel_on entry"):
        durable.function("c", event="x", cancel_on=[{"name": "y"}])(lambda e: e)
    with pytest.raises(ValueError, match="'c2'.*cancel_on if.*not valid CEL"):
        durable.function("c2", event="x", cancel_on=[{"event": "y", "if": "a ="}])(
            lambda e: e
        )
    with pytest.raises(ValueError, match="'k'.*idempotency"):
        durable.function("k", event="x", idempotency=3)(lambda e: e)  # type: ignore[arg-type]


def test_cron_clock_ticks() -> None:
    since = datetime(2026, 3, 28, 23, 30, tzinfo=timezone.utc)
    clock = CronClock("0 2 * * *", "Europe/Paris", since)
    ticks = clock.due(since + timedelta(days=2))
    # 02:00 in Paris: 01:00 UTC before the DST change, 00:00 UTC after it.
    assert [t.astimezone(timezone.utc).hour for t in ticks] == [1, 0]
    assert clock.due(since + timedelta(days=2)) == []
    every = CronClock("* * * * *", None, since)
    assert len(every.due(since + timedelta(days=3))) == 100  # newest 100 only


def test_missed_cron_ticks_start_once_across_apps(make_app: Any, db_url: str) -> None:
    """Two apps on one database (two processes, as far as the database can
    tell) both catch up the ticks missed since the function was first
    served: each tick starts exactly one run."""

    def make() -> tuple[Durable, Flask]:
        durable = Durable()

        @durable.function("minutely", cron="* * * * *")
        def minutely(event: dict[str, Any]) -> Any:
            calls[event["id"]] += 1
            return event["name"]

        return durable, make_app(durable)

    (d1, a1), (d2, a2) = make(), make()
    lifecycle = a1.extensions["durable"]
    lifecycle.ensure_schema()
    # The function was first served three and a half minutes ago.
    key = next(iter(lifecycle.scheduler._crons))
    assert key.startswith("durable-cron:minutely")
    key = cron_key(lifecycle.config.app_id, "minutely", "* * * * *", None)
    lifecycle.store.meta_value(key, str(time.time() - 210))
    with a1.app_context():
        d1.start()
    with a2.app_context():
        d2.start()
    runs = wait_done(d1, a1, 3)
    time.sleep(0.5)
    runs = wait_done(d1, a1, 3)
    assert len(runs) in (3, 4)  # a minute may turn during the test
    assert all(n == 1 for n in calls.values()), calls
    with a1.app_context():
        info = d1.get_run(runs[0].id)
    assert info is not None and info.event is not None
    assert info.event["name"] == "durable/scheduled.timer"
    assert info.output == "durable/scheduled.timer"


def wait_status(durable: Durable, app: Flask, run_id: str, status: str) -> Any:
    end = time.monotonic() + 20
    while True:
        with app.app_context():
            info = durable.get_run(run_id)
        if info is not None and info.status == status:
            return info
        assert time.monotonic() < end, info and info.status
        time.sleep(0.05)


def test_cancel_on_timeouts_and_system_events(make_app: Any) -> None:
    durable = Durable()

    @durable.function(
        "order-flow",
        event="order/placed",
        cancel_on=[
            {"event": "order/cancelled", "match": "data.order"},
            {"event": "order/voided", "if": "async.data.order == event.data.order"},
        ],
    )
    def order_flow(event: dict[str, Any]) -> Any:
        step.run("reserve", calls.update, ["reserve"])
        step.sleep("cool-off", "1h")
        step.run("ship", calls.update, ["ship"])

    @durable.function("slow-start", event="slow/go", timeouts={"start": "1ms"})
    def slow_start(event: dict[str, Any]) -> Any:
        calls["slow-start"] += 1

    @durable.function("short", event="short/go", timeouts={"finish": "1s"})
    def short(event: dict[str, Any]) -> Any:
        step.sleep("long", "1h")

    @durable.function("explode", event="explode/go", retries=0)
    def explode(event: dict[str, Any]) -> Any:
        step.run("boom", _boom)

    @durable.function(
        "cleanup",
        triggers=[
            {"event": "durable/function.failed"},
            {"event": "durable/function.cancelled"},
        ],
    )
    def cleanup(event: dict[str, Any]) -> Any:
        data = event["data"]
        calls[f"cleanup:{data['function_id']}:{event['name']}"] += 1
        return data["event"]["name"]

    app = make_app(durable)
    lifecycle = app.extensions["durable"]
    with app.app_context():
        durable.start()
        a = lifecycle.start_functions(
            [{"name": "order/placed", "data": {"order": 1}, "id": "o1", "ts": 0}]
        )
        b = lifecycle.start_functions(
            [{"name": "order/placed", "data": {"order": 2}, "id": "o2", "ts": 0}]
        )
    wait_status(durable, app, a[0], "sleeping")
    wait_status(durable, app, b[0], "sleeping")
    with app.app_context():
        durable.send("order/cancelled", {"order": 3})  # matches neither
        durable.send("order/cancelled", {"order": 1})
        durable.send("order/voided", {"order": 2})
    wait_status(durable, app, a[0], "cancelled")
    wait_status(durable, app, b[0], "cancelled")
    assert calls["reserve"] == 2 and calls["ship"] == 0

    time.sleep(0.01)
    with app.app_context():
        durable.send("slow/go")
        durable.send("short/go")
        durable.send("explode/go")
    end = time.monotonic() + 20
    want = {
        "cleanup:order-flow:durable/function.cancelled": 2,
        "cleanup:slow-start:durable/function.cancelled": 1,
        "cleanup:short:durable/function.cancelled": 1,
        "cleanup:explode:durable/function.failed": 1,
    }
    while any(calls[k] != v for k, v in want.items()):
        assert time.monotonic() < end, calls
        time.sleep(0.05)
    assert calls["slow-start"] == 0
    with app.app_context():
        runs, _ = durable.list_runs(endpoint="cleanup")
        info = durable.get_run(runs[0].id)
    assert info is not None and info.status == "completed"


def _boom() -> None:
    raise RuntimeError("boom")


def test_invoke_and_send_event(make_app: Any) -> None:
    durable = Durable()

    @durable.function("double", event="math/double")
    def double(event: dict[str, Any]) -> Any:
        calls["double"] += 1
        return step.run("x2", lambda: event["data"]["n"] * 2)

    @durable.function("broken", event="math/broken", retries=0)
    def broken(event: dict[str, Any]) -> Any:
        step.run("boom", _boom)

    @durable.function("slow", event="math/slow")
    def slow(event: dict[str, Any]) -> Any:
        step.sleep("nap", "1h")

    @durable.function("listener", event="math/told")
    def listener(event: dict[str, Any]) -> Any:
        calls["told:" + str(event["data"]["n"])] += 1

    app = make_app(durable)

    @app.post("/compute")
    @durable.endpoint
    def compute() -> Any:
        four = step.invoke("double", double, {"n": 2})
        eight = step.invoke("double", "double", {"n": four})
        failed = None
        try:
            step.invoke("broken", broken)
        except Exception as e:  # StepError
            failed = type(e).__name__ + ": " + str(e)
        late = step.invoke("slow", slow, timeout="1s")
        sent = step.send_event("tell", "math/told", {"n": eight})
        return {"eight": eight, "failed": failed, "late": late, "sent": sent}

    client = app.test_client()
    with app.app_context():
        durable.start()
    r = client.post("/compute", follow_redirects=True)
    assert r.status_code == 200, r.text
    body = r.get_json()
    assert body["eight"] == 8
    assert body["failed"].startswith("StepError: step 'broken' failed: FunctionFailed")
    assert body["late"] is None
    assert body["sent"].endswith(":tell")
    end = time.monotonic() + 10
    while calls["told:8"] != 1:
        assert time.monotonic() < end, calls
        time.sleep(0.05)
    assert calls["double"] == 2  # each child ran once
    with app.app_context():
        runs, _ = durable.list_runs(endpoint="double")
        assert len(runs) == 2 and all(r.status == "completed" for r in runs)
        with pytest.raises(ValueError, match="no durable function 'nope'"):
            app.extensions["durable"].invoke("nope", "p", "s", {})
