"""The app of tests/test_steps.py and tests/test_wait.py: steps that succeed,
fail for a while, fail for good; request bodies echoed back; repeated step
ids. Not a test module (no ``test_`` prefix)."""

from __future__ import annotations

from collections import Counter
from typing import Any

from flask import Flask, jsonify, request

from flask_durable import (
    Durable,
    NonRetriableError,
    StepError,
    current_run,
    current_step,
    step,
)

durable = Durable()


def build(make_app: Any, **config: Any) -> tuple[Flask, Counter[str]]:
    app = make_app(**config)
    calls: Counter[str] = Counter()
    failures: dict[str, int] = {}
    ext = durable

    def flaky(name: str, times: int) -> str:
        calls[name] += 1
        left = failures.setdefault(name, times)
        if left > 0:
            failures[name] = left - 1
            raise ConnectionError(f"{name} down")
        return f"{name}-ok"

    @app.post("/three")
    @ext.endpoint
    def three() -> Any:
        a = step.run("a", lambda: calls.update(["a"]) or 1)
        b = step.run("b", lambda x: calls.update(["b"]) or x + 1, a)
        c = step.run("c", lambda x: calls.update(["c"]) or x * 10, b)
        return jsonify(a=a, b=b, c=c, replay=current_run.is_replay)

    @app.post("/retry")
    @ext.endpoint
    def retry() -> Any:
        first = step.run("first", lambda: calls.update(["first"]) or "one")
        second = step.run("second", flaky, "second", 2)
        return jsonify(first=first, second=second, attempt=current_run.attempt)

    @app.post("/fatal")
    @ext.endpoint
    def fatal() -> Any:
        def boom() -> None:
            calls["fatal"] += 1
            raise NonRetriableError("card declined")

        try:
            step.run("charge", boom)
        except StepError as e:
            return jsonify(step=e.step_id, type=e.error_type, msg=e.error_message), 402
        return "unreachable"

    @app.post("/exhaust")
    @ext.endpoint(retries=1)
    def exhaust() -> Any:
        step.run("always", flaky, "always", 100)
        return "unreachable"

    @app.route("/echo", methods=["POST", "PUT", "PATCH"])
    @ext.endpoint
    def echo() -> Any:
        step.run("fail-once", flaky, "echo", 1)
        return jsonify(
            method=request.method,
            body=request.get_data().hex(),
            form=request.form.to_dict(),
            query=request.args.to_dict(),
            ctype=request.content_type,
        )

    @app.get("/repeat")
    @ext.endpoint(id="repeat-endpoint")
    def repeat() -> Any:
        ids = [step.run("fetch", lambda: current_step.id) for _ in range(3)]
        keys = step.run("key", lambda: current_step.idempotency_key)
        return jsonify(ids=ids, key=keys, run=current_run.id)

    return app, calls
