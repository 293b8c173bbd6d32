"""The extension object: ``init_app`` once per app, several apps in one
process, an app without ``init_app``, API calls outside requests."""

from __future__ import annotations

from typing import Any

import pytest
from flask import Flask, jsonify

from flask_durable import Durable, current_run, step

durable = Durable()


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
