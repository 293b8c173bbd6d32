"""What a step may not do: outgrow DURABLE_MAX_STEP_OUTPUT,
DURABLE_MAX_RUN_STATE or DURABLE_MAX_STEPS, or nest in another step."""

from __future__ import annotations

from typing import Any

from flask import jsonify

from flask_durable import Durable, step
from flask_durable.errors import StepError

durable = Durable()


def test_step_output_limit(make_app: Any) -> None:
    app = make_app(DURABLE_MAX_STEP_OUTPUT=100)

    @app.get("/")
    @durable.endpoint
    def view() -> Any:
        small = step.run("small", lambda: "x" * 10)
        try:
            step.run("big", lambda: "x" * 200)
        except StepError as e:
            return jsonify(small=small, step=e.step_id, msg=e.error_message), 413
        return "no"

    r = app.test_client().get("/")
    assert r.status_code == 413
    assert r.json["step"] == "big"
    assert "DURABLE_MAX_STEP_OUTPUT" in r.json["msg"]
    run_id = r.headers["Durable-Run-Id"]
    with app.app_context():
        info = durable.get_run(run_id)
    assert info is not None
    assert [(s.id, s.status) for s in info.steps] == [
        ("small", "completed"),
        ("big", "failed"),
    ]


def test_run_state_and_step_count_limits(make_app: Any) -> None:
    app = make_app(DURABLE_MAX_RUN_STATE=50, DURABLE_MAX_STEPS=3)

    @app.get("/state")
    @durable.endpoint
    def state() -> Any:
        try:
            for i in range(10):
                step.run(f"s{i}", lambda: "y" * 20)
        except StepError as e:
            return jsonify(step=e.step_id, msg=e.error_message), 500
        return "no"

    @app.get("/count")
    @durable.endpoint
    def count() -> Any:
        try:
            for _ in range(10):
                step.run("s", lambda: 1)
        except StepError as e:
            return jsonify(step=e.step_id, msg=e.error_message), 500
        return "no"

    client = app.test_client()
    r = client.get("/state")
    assert r.json["step"] == "s2"
    assert "DURABLE_MAX_RUN_STATE" in r.json["msg"]
    r = client.get("/count")
    assert r.json["step"] == "s:3"
    assert "DURABLE_MAX_STEPS" in r.json["msg"]


def test_nested_steps_are_refused(make_app: Any) -> None:
    app = make_app()

    @app.get("/")
    @durable.endpoint
    def view() -> Any:
        try:
            step.run("outer", lambda: step.run("inner", lambda: 1))
        except StepError as e:
            return jsonify(type=e.error_type, msg=e.error_message)
        return "no"

    r = app.test_client().get("/")
    assert r.json["type"] == "StepNestingError"
    assert "do not nest" in r.json["msg"]
