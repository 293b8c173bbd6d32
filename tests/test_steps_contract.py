"""SPEC 6, the contract of steps with the views that call them: swallowed
control-flow signals, logged failures, the history of failed attempts, and
the public ``current_run`` / ``current_step`` objects."""

from __future__ import annotations

import dataclasses
import logging
import time
from datetime import datetime
from typing import Any

import pytest
from flask import Flask, jsonify

from flask_durable import (
    Durable,
    RunStatus,
    StepInfo,
    current_run,
    current_step,
    step,
)
from flask_durable.execution import Execution

durable = Durable()


@pytest.fixture
def db_url(any_db_url: str) -> str:
    return any_db_url


def get_run(app: Flask, run_id: str) -> Any:
    with app.app_context():
        return durable.get_run(run_id)


def durable_records(
    caplog: pytest.LogCaptureFixture, run_id: str, level: int
) -> list[logging.LogRecord]:
    return [
        r
        for r in caplog.records
        if r.name == "flask_durable" and r.levelno == level and run_id in r.getMessage()
    ]


def wait_terminal(app: Flask, run_id: str) -> Any:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        info = get_run(app, run_id)
        if info is not None and info.is_terminal:
            return info
        time.sleep(0.02)
    raise AssertionError(f"run {run_id} did not finish")


# -- a view that swallows the suspend signal ---------------------------------------


def boom() -> None:
    raise OSError("down")


@pytest.fixture
def swallowing_app(make_app: Any) -> Flask:
    app = make_app()
    calls: list[str] = []
    caught: list[BaseException] = []
    app.config.update(calls=calls, caught=caught)

    @app.post("/bare")
    @durable.endpoint
    def bare() -> Any:
        try:
            step.sleep("nap", "1h")
        except:  # noqa: E722 - what this test is about
            pass
        return jsonify(ok=True)

    @app.post("/base")
    @durable.endpoint
    def base() -> Any:
        try:
            step.sleep("nap", "1h")
        except BaseException:  # noqa: B036 - what this test is about
            pass
        return jsonify(ok=True)

    @app.post("/retry")
    @durable.endpoint
    def retry() -> Any:
        try:
            step.run("flaky", boom)  # failed: the run would be retried
        except BaseException:  # noqa: B036
            pass
        return jsonify(ok=True)

    @app.post("/then-step")
    @durable.endpoint
    def then_step() -> Any:
        try:
            step.sleep("nap", "1h")
        except BaseException:  # noqa: B036
            pass
        try:
            step.run("next", calls.append, "next")
        except RuntimeError as e:
            caught.append(e)
            raise
        return jsonify(ok=True)

    return app


@pytest.mark.parametrize("path", ["/bare", "/base", "/retry"])
def test_swallowed_suspend_fails_the_run(
    swallowing_app: Flask,
    live_server: Any,
    caplog: pytest.LogCaptureFixture,
    path: str,
) -> None:
    caplog.set_level(logging.WARNING, logger="flask_durable")
    r = live_server(swallowing_app).post(path)
    assert r.status_code == 500, r.text
    run_id = r.headers["Durable-Run-Id"]
    info = wait_terminal(swallowing_app, run_id)
    assert info.status == RunStatus.FAILED
    assert info.response is not None and info.response[0] == 500
    assert info.error is not None and "bare 'except:'" in info.error
    logged = durable_records(caplog, run_id, logging.ERROR)
    assert logged and "bare 'except:'" in logged[0].getMessage()
    time.sleep(0.3)  # and it stays failed: nothing resumes it
    assert get_run(swallowing_app, run_id).status == RunStatus.FAILED


def test_step_after_a_swallowed_suspend_raises(
    swallowing_app: Flask, live_server: Any
) -> None:
    r = live_server(swallowing_app).post("/then-step")
    assert r.status_code == 500
    caught = swallowing_app.config["caught"]
    assert len(caught) == 1 and type(caught[0]) is RuntimeError
    message = str(caught[0])
    assert "step.run" in message and "bare 'except:'" in message
    assert swallowing_app.config["calls"] == []  # the step never ran
    info = wait_terminal(swallowing_app, r.headers["Durable-Run-Id"])
    assert info.status == RunStatus.FAILED
    assert "next" not in [s.id for s in info.steps]


# -- failures are logged and kept ----------------------------------------------------


@pytest.fixture
def failing_app(make_app: Any) -> Flask:
    app = make_app()
    errors = [OSError("first failure"), RuntimeError("second failure")]
    raised: list[BaseException] = []
    app.config["raised"] = raised

    def flaky() -> str:
        if len(raised) < len(errors):
            raised.append(errors[len(raised)])
            raise raised[-1]
        return "third time lucky"

    def hopeless() -> None:
        raise ValueError("never works")

    @app.post("/flaky")
    @durable.endpoint
    def flaky_view() -> Any:
        return jsonify(value=step.run("flaky", flaky))

    @app.post("/hopeless")
    @durable.endpoint(retries=0)
    def hopeless_view() -> Any:
        step.run("hopeless", hopeless)
        return "unreachable"

    return app


def test_step_failures_are_logged(
    failing_app: Flask, live_server: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="flask_durable")
    server = live_server(failing_app)
    r = server.post("/flaky")
    assert r.status_code == 200 and r.json() == {"value": "third time lucky"}
    run_id = r.headers["Durable-Run-Id"]
    warnings = durable_records(caplog, run_id, logging.WARNING)
    assert len(warnings) == 2, [w.getMessage() for w in warnings]
    raised = failing_app.config["raised"]
    for attempt, (record, error) in enumerate(zip(warnings, raised, strict=True)):
        message = record.getMessage()
        assert "'flaky'" in message and f"attempt {attempt}" in message
        assert record.exc_info is not None and record.exc_info[1] is error
    assert durable_records(caplog, run_id, logging.ERROR) == []

    r = server.post("/hopeless")
    assert r.status_code == 500
    run_id = r.headers["Durable-Run-Id"]
    (warning,) = durable_records(caplog, run_id, logging.WARNING)
    assert "'hopeless'" in warning.getMessage()
    assert "attempt 0" in warning.getMessage()
    assert warning.exc_info is not None
    assert isinstance(warning.exc_info[1], ValueError)
    (error,) = durable_records(caplog, run_id, logging.ERROR)
    assert "never works" in error.getMessage()


def test_get_run_keeps_every_failed_attempt(
    failing_app: Flask, live_server: Any
) -> None:
    r = live_server(failing_app).post("/flaky")
    assert r.status_code == 200
    info = get_run(failing_app, r.headers["Durable-Run-Id"])
    assert isinstance(info.status, RunStatus) and info.status is RunStatus.COMPLETED
    (flaky,) = info.steps
    assert isinstance(flaky, StepInfo)
    assert flaky.status == "completed" and flaky.output == "third time lucky"
    assert flaky.attempts == 3
    history = flaky.attempt_errors
    assert [(e["attempt"], e["type"], e["message"]) for e in history] == [
        (0, "OSError", "first failure"),
        (1, "RuntimeError", "second failure"),
    ]
    for entry in history:
        assert isinstance(entry["at"], datetime)
        assert isinstance(entry["traceback"], str)
        assert "Traceback" in entry["traceback"]
        assert f"{entry['type']}: {entry['message']}" in entry["traceback"]
    assert history[0]["at"] <= history[1]["at"]

    r = live_server(failing_app).post("/hopeless")
    failed = get_run(failing_app, r.headers["Durable-Run-Id"])
    assert failed.status is RunStatus.FAILED
    (hopeless,) = failed.steps
    assert hopeless.status == "failed"
    assert [(e["attempt"], e["type"]) for e in hopeless.attempt_errors] == [
        (0, "ValueError")
    ]


# -- current_run and current_step ---------------------------------------------


def describe(obj: Any) -> dict[str, Any]:
    """What a view or step sees of a public context object."""
    try:
        obj.attempt = 99
        assigned: type[BaseException] | None = None
    except Exception as e:
        assigned = type(e)
    return {
        "type": type(obj),
        "public": {name for name in dir(obj) if not name.startswith("_")},
        "assign_error": assigned,
        "has_engine_state": hasattr(obj, "memo") or hasattr(obj, "committer"),
        "is_execution": isinstance(obj, Execution),
        "is_dataclass": dataclasses.is_dataclass(obj),
    }


def test_current_run_and_current_step(make_app: Any, live_server: Any) -> None:
    app = make_app()
    runs: list[dict[str, Any]] = []
    steps: list[dict[str, Any]] = []

    def charge() -> str:
        obj = current_step._get_current_object()  # type: ignore[attr-defined]
        steps.append(
            dict(
                describe(obj),
                id=current_step.id,
                attempt=current_step.attempt,
                key=current_step.idempotency_key,
            )
        )
        if current_step.id == "charge" and current_step.attempt == 0:
            raise OSError("card network down")
        return current_step.idempotency_key

    @app.post("/who")
    @durable.endpoint(id="who-am-i")
    def who() -> Any:
        obj = current_run._get_current_object()  # type: ignore[attr-defined]
        runs.append(
            dict(
                describe(obj),
                id=current_run.id,
                attempt=current_run.attempt,
                is_replay=current_run.is_replay,
                endpoint=current_run.endpoint,
                durable_is_replay=durable.is_replay(),
            )
        )
        try:
            current_run.attempt = 5  # through the proxy
        except AttributeError:
            pass
        else:
            raise AssertionError("current_run.attempt could be assigned")
        first = step.run("charge", charge)
        second = step.run("charge", charge)
        return jsonify(first=first, second=second)

    r = live_server(app).post("/who")
    assert r.status_code == 200
    run_id = r.headers["Durable-Run-Id"]

    assert [
        (s["id"], s["attempt"], s["is_replay"], s["durable_is_replay"]) for s in runs
    ] == [(run_id, 0, False, False), (run_id, 1, True, True)]
    for seen in runs:
        assert seen["endpoint"] == "who-am-i"
        assert seen["public"] == {"id", "attempt", "is_replay", "endpoint"}
        assert seen["assign_error"] is not None
        assert issubclass(seen["assign_error"], AttributeError)
        assert not seen["is_execution"] and not seen["has_engine_state"]
        assert seen["is_dataclass"]

    assert [(s["id"], s["attempt"]) for s in steps] == [
        ("charge", 0),
        ("charge", 1),
        ("charge:1", 0),
    ]
    keys = [s["key"] for s in steps]
    assert keys[0] == keys[1] != keys[2]  # stable across retries, per step
    assert r.json() == {"first": keys[0], "second": keys[2]}
    for seen in steps:
        assert {"id", "attempt", "idempotency_key"} <= seen["public"]
        assert seen["assign_error"] is not None
        assert not seen["is_execution"] and not seen["has_engine_state"]

    # Another run gets other keys.
    again = live_server(app).post("/who")
    assert again.status_code == 200
    assert not {again.json()["first"], again.json()["second"]} & set(keys)
