"""Unit tests: durations, serialization, the extension, misuse errors."""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
from flask import Flask, jsonify

from flask_durable import Durable, current_run, current_step, step
from flask_durable.durations import parse_duration, parse_instant
from flask_durable.errors import RetryAfterError, StepError
from flask_durable.events import matches
from flask_durable.serde import dump_value, load_value

durable = Durable()


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("30s", 30),
        ("5m", 300),
        ("1h30m", 5400),
        ("2d", 172800),
        ("1.5s", 1.5),
        ("250ms", 0.25),
        (" 1h 5s ", 3605),
        ("42", 42),
        (7, 7),
        (0.5, 0.5),
        (timedelta(minutes=2), 120),
    ],
)
def test_parse_duration(value: Any, seconds: float) -> None:
    assert parse_duration(value) == pytest.approx(seconds)


@pytest.mark.parametrize("value", ["", "ten", "5x", "s", "1h-5m", "-3s", -1, "1e999"])
def test_parse_duration_rejects(value: Any) -> None:
    with pytest.raises(ValueError):
        parse_duration(value)


@pytest.mark.parametrize("value", [None, True, [1], object()])
def test_parse_duration_type_errors(value: Any) -> None:
    with pytest.raises(TypeError):
        parse_duration(value)


def test_parse_instant() -> None:
    aware = datetime(2030, 1, 2, 3, 4, 5, tzinfo=timezone.utc)
    assert parse_instant(aware) == aware.timestamp()
    assert parse_instant(datetime(2030, 1, 2, 3, 4, 5)) == aware.timestamp()
    assert parse_instant("2030-01-02T03:04:05Z") == aware.timestamp()
    assert parse_instant("2030-01-02T04:04:05+01:00") == aware.timestamp()
    with pytest.raises(ValueError):
        parse_instant("tomorrow")
    with pytest.raises(TypeError):
        parse_instant(5)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "value",
    [
        None,
        True,
        3,
        2.5,
        "text",
        [1, "a", None],
        (1, 2, (3,)),
        b"\x00\xff",
        uuid.UUID(int=5),
        datetime(2030, 1, 2, 3, 4, 5, 678901, tzinfo=timezone.utc),
        datetime(2030, 1, 2, 3, 4, 5, 6),
        {"nested": {"t": (1, b"x")}, " t": "looks like a tag"},
    ],
)
def test_values_round_trip(value: Any) -> None:
    assert load_value(dump_value(value)) == value
    assert type(load_value(dump_value(value))) is type(value)


@pytest.mark.parametrize("value", [{1, 2}, object(), {"k": object()}, 1j])
def test_unstorable_values_are_type_errors(value: Any) -> None:
    with pytest.raises(TypeError):
        dump_value(value)


def test_matches_dotted_paths() -> None:
    event = {"name": "n", "data": {"a": {"b": 1}, "flag": True, "items": [5, 6]}}
    assert matches({}, event)
    assert matches({"data.a.b": 1, "name": "n"}, event)
    assert matches({"data.items.1": 6}, event)
    assert not matches({"data.a.b": 2}, event)
    assert not matches({"data.missing": None}, event)
    assert not matches({"data.flag": 1}, event)  # True is not 1 here


def test_step_outside_a_durable_view_is_runtime_error() -> None:
    with pytest.raises(RuntimeError, match="@durable.endpoint"):
        step.run("x", lambda: 1)
    with pytest.raises(RuntimeError):
        step.sleep("x", "1s")
    with pytest.raises(RuntimeError):
        step.wait_for_event("x", event="e", timeout="1s")
    with pytest.raises(RuntimeError):
        step.parallel(lambda: 1)
    with pytest.raises(RuntimeError, match="current_run"):
        current_run.id  # noqa: B018
    with pytest.raises(RuntimeError, match="current_step"):
        current_step.id  # noqa: B018


def test_double_init_app_raises(make_app: Any) -> None:
    app = make_app()
    with pytest.raises(RuntimeError, match="already"):
        durable.init_app(app)


def test_uninitialized_app_is_a_clear_error() -> None:
    app = Flask(__name__)

    @app.get("/")
    @durable.endpoint
    def view() -> str:
        return "x"

    app.config["PROPAGATE_EXCEPTIONS"] = True
    with pytest.raises(RuntimeError, match="init_app"):
        app.test_client().get("/")


@pytest.mark.parametrize(
    "options", [{"retries": -1}, {"retries": "3"}, {"id": ""}, {"timeout": "soon"}]
)
def test_bad_endpoint_options(options: Any) -> None:
    with pytest.raises((ValueError, TypeError)):
        durable.endpoint(**options)


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("DURABLE_RETRIES", -1),
        ("DURABLE_CHECKPOINT", "later"),
        ("DURABLE_WAIT_TIMEOUT", "x"),
    ],
)
def test_bad_config_is_a_clear_error(make_app: Any, key: str, value: Any) -> None:
    with pytest.raises(ValueError, match=key):
        make_app(**{key: value})


def test_in_memory_sqlite_is_refused(make_app: Any) -> None:
    with pytest.raises(ValueError, match="SQLite file"):
        make_app(DURABLE_DATABASE_URI="sqlite://")


def test_default_database_in_instance_path(tmp_path: Any) -> None:
    app = Flask(__name__, instance_path=str(tmp_path / "inst"))
    Durable(app)
    try:

        @app.get("/")
        @durable.endpoint
        def view() -> Any:
            return jsonify(v=step.run("s", lambda: 1))

        assert app.test_client().get("/").json == {"v": 1}
        assert (tmp_path / "inst" / "durable.sqlite3").exists()
    finally:
        app.extensions["durable"].close()


def test_several_apps_in_one_process(make_app: Any, tmp_path: Any) -> None:
    a = make_app()
    b = make_app(DURABLE_DATABASE_URI=f"sqlite:///{tmp_path / 'b.sqlite3'}")
    for app in (a, b):

        @app.get("/")
        @durable.endpoint
        def view() -> Any:
            return jsonify(v=step.run("s", lambda: current_run.id))

    ra = a.test_client().get("/")
    rb = b.test_client().get("/")
    with a.app_context():
        assert durable.get_run(ra.json["v"]) is not None
        assert durable.get_run(rb.json["v"]) is None
    with b.app_context():
        assert durable.get_run(rb.json["v"]) is not None


def test_non_serializable_step_value_names_the_step(make_app: Any) -> None:
    app = make_app()

    @app.get("/")
    @durable.endpoint
    def view() -> Any:
        try:
            step.run("make-set", lambda: {1, 2})
        except TypeError as e:
            return jsonify(error=str(e)), 500
        return "no"

    r = app.test_client().get("/")
    assert r.status_code == 500
    assert "'make-set'" in r.json["error"]


def test_first_run_returns_round_tripped_value(make_app: Any) -> None:
    app = make_app()
    seen: list[Any] = []

    @app.get("/")
    @durable.endpoint
    def view() -> Any:
        value = step.run("v", lambda: (1, [2], datetime(2030, 1, 1)))
        seen.append(value)
        return "ok"

    app.test_client().get("/")
    assert seen == [(1, [2], datetime(2030, 1, 1))]
    assert isinstance(seen[0], tuple)


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


def test_retry_after_error_keeps_its_message() -> None:
    e = RetryAfterError("slow down", "30s")
    assert str(e) == "slow down"
    assert e.retry_after == "30s"
    err = StepError("s", "KeyError", "k")
    assert (err.step_id, err.error_type, err.error_message) == ("s", "KeyError", "k")
    assert "KeyError" in str(err)


def test_is_replay_false_on_first_request(make_app: Any) -> None:
    app = make_app()

    @app.get("/")
    @durable.endpoint
    def view() -> Any:
        return jsonify(replay=durable.is_replay(), attempt=current_run.attempt)

    assert app.test_client().get("/").json == {"replay": False, "attempt": 0}


def test_replay_marker_cannot_be_sent_by_a_client(make_app: Any) -> None:
    app = make_app()

    @app.get("/")
    @durable.endpoint
    def view() -> Any:
        return jsonify(replay=durable.is_replay())

    r = app.test_client().get(
        "/", headers={"Flask-Durable-Replay": "1", "X-Flask-Durable.Replay": "1"}
    )
    assert r.json == {"replay": False}


def test_api_calls_outside_requests_start_no_threads(make_app: Any) -> None:
    import threading

    app = make_app()
    before = set(threading.enumerate())
    with app.app_context():
        event_id = durable.send("some/event", {"a": 1})
        assert durable.get_run("0" * 32) is None
        assert durable.cancel("0" * 32) is False
    assert isinstance(event_id, str)
    assert set(threading.enumerate()) - before == set()
