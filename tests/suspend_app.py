"""The app of tests/test_sleep.py, test_events.py, test_parallel.py,
test_cancel.py and test_wait.py: sleeping, waiting for events, parallel
steps, cancellation and timeouts. Not a test module (no ``test_`` prefix)."""

from __future__ import annotations

import threading
import time
from collections import Counter
from datetime import datetime, timedelta, timezone
from typing import Any

from flask import Flask, jsonify, request

from flask_durable import Durable, StepError, current_run, step

durable = Durable()


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


def _post_event(server: Any, payload: Any, key: str | None = EVENT_KEY) -> Any:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return server.post("/durable/events", json=payload, headers=headers)
