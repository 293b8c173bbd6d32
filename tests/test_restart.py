"""Runs outlive the app instance that started them: timers lost with a
process are found again by the sweeper of the next one."""

from __future__ import annotations

import time
from typing import Any

from flask import Flask, jsonify

from flask_durable import Durable, step

durable = Durable()


def routes(app: Flask) -> Flask:
    @app.post("/nap")
    @durable.endpoint
    def nap() -> Any:
        step.sleep("nap", "2s")
        return jsonify(woke=time.time())

    @app.before_request
    def guard() -> Any:
        if app.config.get("LOCKED") and durable.is_replay():
            return jsonify(error="locked"), 423
        return None

    return app


def test_server_restarted_during_sleep_wakes_on_time(
    make_app: Any, live_server: Any
) -> None:
    first = routes(make_app())
    server = live_server(first)
    r = server.post("/nap", allow_redirects=False)
    due = time.time() + 2
    location = r.headers["Location"]
    server.stop()
    first.extensions["durable"].close()  # the process is gone, timers too

    second = routes(make_app())
    server = live_server(second)
    final = server.get(location)
    assert final.status_code == 200
    woke = final.json()["woke"]
    assert woke >= due - 0.05
    assert woke <= due + 0.2 + 1.0  # poll interval + 1 s


def test_replay_answered_before_the_view_finishes_the_run(
    make_app: Any, live_server: Any
) -> None:
    app = routes(make_app())
    server = live_server(app)
    r = server.post("/nap", allow_redirects=False)
    app.config["LOCKED"] = True
    final = server.get(r.headers["Location"])
    assert final.status_code == 423
    assert final.json() == {"error": "locked"}
    run_id = r.headers["Durable-Run-Id"]
    assert final.headers["Durable-Run-Id"] == run_id
    with app.app_context():
        info = durable.get_run(run_id)
    assert info is not None and info.status == "failed"
