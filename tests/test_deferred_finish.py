"""With ``DURABLE_SQLITE_SYNCHRONOUS="FULL"`` every commit waits for the
disk, so a sync run's final response is committed with the next checkpoint
of any run (or by the writer thread when no request comes)."""

from __future__ import annotations

import sqlite3
import time
from typing import Any

from flask import jsonify

from flask_durable import Durable, step

durable = Durable()

#: Long enough that the writer thread does not commit first.
INTERVAL = 3.0


def stored_status(db_url: str, run_id: str) -> str | None:
    path = db_url.removeprefix("sqlite:///")
    with sqlite3.connect(path) as conn:
        row = conn.execute(
            "SELECT status FROM durable_runs WHERE id = ?", (run_id,)
        ).fetchone()
    return None if row is None else str(row[0])


def make(make_app: Any) -> Any:
    app = make_app(
        DURABLE_SQLITE_SYNCHRONOUS="FULL", DURABLE_CHECKPOINT_INTERVAL=INTERVAL
    )

    @app.post("/trip/<name>")
    @durable.endpoint
    def trip(name: str) -> Any:
        seat = step.run("seat", lambda: f"{name}-12A")
        fare = step.run("fare", lambda: 120)
        return jsonify(seat=seat, fare=fare)

    return app


def test_final_response_rides_with_the_next_commit(
    make_app: Any, live_server: Any, db_url: str
) -> None:
    app = make(make_app)
    assert app.extensions["durable"].defer_finish
    server = live_server(app)

    first = server.post("/trip/ada")
    assert first.status_code == 200
    a = first.headers["Durable-Run-Id"]
    # Both steps are committed; the response is not stored yet.
    assert stored_status(db_url, a) == "running"

    second = server.post("/trip/bob")
    assert second.json() == {"seat": "bob-12A", "fare": 120}
    b = second.headers["Durable-Run-Id"]
    # The first checkpoint of "bob" committed "ada"'s response with it.
    assert stored_status(db_url, a) == "completed"
    assert stored_status(db_url, b) == "running"

    # No more requests: the writer thread commits "bob" on its own.
    deadline = time.monotonic() + 20
    while stored_status(db_url, b) != "completed":
        assert time.monotonic() < deadline, "deferred response never committed"
        time.sleep(0.1)

    with app.app_context():
        info = durable.get_run(a)
    assert info is not None and info.response is not None
    assert info.response[0] == 200
    assert info.response[2] == first.content


def test_a_waiting_client_gets_the_deferred_response(
    make_app: Any, live_server: Any, db_url: str
) -> None:
    server = live_server(make(make_app))
    headers = {"Idempotency-Key": "trip-1"}
    first = server.post("/trip/cy", headers=headers)
    assert stored_status(db_url, first.headers["Durable-Run-Id"]) == "running"
    # The repeat finds the run not finished yet: it is sent to the wait URL,
    # which answers once the writer thread has committed the response.
    repeat = server.post("/trip/cy", headers=headers)
    assert [r.status_code for r in repeat.history] == [303]
    assert repeat.status_code == 200
    assert repeat.content == first.content


def test_shutdown_commits_deferred_responses(make_app: Any, db_url: str) -> None:
    app = make(make_app)
    run_id = app.test_client().post("/trip/dee").headers["Durable-Run-Id"]
    assert stored_status(db_url, run_id) == "running"
    app.extensions["durable"].close()
    assert stored_status(db_url, run_id) == "completed"


def test_get_run_commits_deferred_responses_first(make_app: Any) -> None:
    app = make(make_app)
    response = app.test_client().post("/trip/eve")
    with app.app_context():
        info = durable.get_run(response.headers["Durable-Run-Id"])
    assert info is not None and info.status == "completed"
    assert info.response is not None and info.response[2] == response.data
