"""An unavailable database is a clear 503, and nothing is lost."""

from __future__ import annotations

import sqlite3
from collections import Counter
from typing import Any

from flask import jsonify

from flask_durable import Durable, step

durable = Durable()


def test_locked_sqlite_is_503_then_recovers(
    make_app: Any, live_server: Any, db_url: str
) -> None:
    app = make_app(DURABLE_SQLITE_BUSY_TIMEOUT=0.2)
    calls: Counter[str] = Counter()

    @app.post("/go")
    @durable.endpoint
    def go() -> Any:
        return jsonify(v=step.run("one", lambda: calls.update(["one"]) or 1))

    @app.get("/plain")
    def plain() -> str:
        return "plain"

    server = live_server(app)
    assert server.post("/go").status_code == 200  # creates the tables
    locker = sqlite3.connect(db_url.removeprefix("sqlite:///"), isolation_level=None)
    locker.execute("BEGIN EXCLUSIVE")
    try:
        r = server.post("/go")
        assert r.status_code == 503
        assert r.headers["Retry-After"]
        assert "unavailable" in r.json()["error"]
        assert server.get("/plain").text == "plain"
    finally:
        locker.execute("ROLLBACK")
        locker.close()
    r = server.post("/go")
    assert r.status_code == 200
    assert r.json() == {"v": 1}
