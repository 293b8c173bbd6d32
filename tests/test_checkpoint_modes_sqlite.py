"""``DURABLE_SQLITE_SYNCHRONOUS="FULL"``: every step's commit is synced to
disk; the final response is written without a sync of its own (the next
commit's sync covers it), and the setting is back to FULL afterwards."""

from __future__ import annotations

import sqlite3
from typing import Any

from flask import jsonify

from flask_durable import Durable, step

durable = Durable()


def stored(db_url: str, run_id: str) -> tuple[str, bytes] | None:
    path = db_url.removeprefix("sqlite:///")
    with sqlite3.connect(path) as conn:
        row = conn.execute(
            "SELECT status, response FROM durable_runs WHERE id = ?", (run_id,)
        ).fetchone()
    return None if row is None else (str(row[0]), bytes(row[1]))


def test_full_mode_stores_the_response_and_stays_full(
    make_app: Any, live_server: Any, db_url: str
) -> None:
    app = make_app(DURABLE_SQLITE_SYNCHRONOUS="FULL")
    store = app.extensions["durable"].store

    def synchronous() -> int:
        # The setting of the connection every write goes through (2 = FULL).
        with store._lock:
            raw = store._writer.driver_connection
            return int(raw.execute("PRAGMA synchronous").fetchone()[0])

    seen: list[int] = []

    @app.post("/trip/<name>")
    @durable.endpoint
    def trip(name: str) -> Any:
        seat = step.run("seat", lambda: f"{name}-12A")
        seen.append(synchronous())
        fare = step.run("fare", lambda: 120)
        return jsonify(seat=seat, fare=fare)

    server = live_server(app)
    for name in ("ada", "bob"):
        r = server.post(f"/trip/{name}")
        assert r.json() == {"seat": f"{name}-12A", "fare": 120}
        found = stored(db_url, r.headers["Durable-Run-Id"])
        assert found is not None and found[0] == "completed"
        assert found[1].endswith(r.content)
    # Steps of both runs were committed with FULL, also the one after the
    # first run's final response; so is everything after.
    assert seen == [2, 2]
    assert synchronous() == 2
