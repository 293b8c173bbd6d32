"""Sleeping over real HTTP: ``step.sleep`` and ``step.sleep_until`` answer
through the wait URL on time."""

from __future__ import annotations

import time
from typing import Any

import pytest
from flask import jsonify
from suspend_app import build, durable

from flask_durable import current_step, step


@pytest.fixture
def db_url(any_db_url: str) -> str:
    """Every test here runs on SQLite and on PostgreSQL."""
    return any_db_url


def test_sleep_answers_via_wait_url_on_time(make_app: Any, live_server: Any) -> None:
    app, calls = build(make_app)
    server = live_server(app)
    began = time.time()
    r = server.post("/nap?for=2s", allow_redirects=False)
    assert r.status_code == 303
    assert r.json()["status"] == "sleeping"
    run_id = r.headers["Durable-Run-Id"]
    # Nothing is held for the sleeping run in this process.
    assert run_id not in app.extensions["durable"].active
    final = server.get(r.headers["Location"])
    elapsed = time.time() - began
    assert final.status_code == 200
    assert final.json()["slept"] >= 2.0
    assert elapsed >= 2.0
    # Due after 2 s; allowed: DURABLE_POLL_INTERVAL (0.2) + 1 s.
    assert elapsed <= 2.0 + 0.2 + 1.0 + 0.5
    assert calls["after"] == 1


def test_sleep_until_and_past_instants(make_app: Any, live_server: Any) -> None:
    app, _ = build(make_app)
    server = live_server(app)
    r = server.post("/nap-until")
    assert r.status_code == 200
    assert r.json() == {"woke_after": True}
    assert len(r.history) == 1


def test_malformed_duration_is_value_error_naming_step(
    make_app: Any, live_server: Any
) -> None:
    app, _ = build(make_app)
    server = live_server(app)
    r = server.post("/bad-sleep")
    assert r.status_code == 400
    assert "zzz" in r.json()["error"]
    assert "malformed duration" in r.json()["error"]


def test_a_finished_sleep_is_written_with_the_next_checkpoint(
    make_app: Any, live_server: Any
) -> None:
    app = make_app()
    seen: list[str] = []

    def sleep_row_status() -> str:
        # What the database holds for the sleep while the next step runs.
        with app.app_context():
            info = durable.get_run(current_step.run_id)
        assert info is not None
        seen.append({s.id: s.status for s in info.steps}["nap"])
        return "done"

    @app.post("/fold")
    @durable.endpoint
    def fold() -> Any:
        step.run("before", lambda: 1)
        step.sleep("nap", 0.3)
        step.run("after", sleep_row_status)
        step.sleep("short", 0)
        return jsonify(ok=True)

    r = live_server(app).post("/fold")
    assert r.json() == {"ok": True}
    assert r.history[0].status_code == 303
    # The completion of the sleep cost no commit of its own: it was still
    # "sleeping" in the database while "after" ran, then committed with it.
    assert seen == ["sleeping"]
    with app.app_context():
        info = durable.get_run(r.headers["Durable-Run-Id"])
    assert info is not None
    assert [(s.id, s.status) for s in info.steps] == [
        ("before", "completed"),
        ("nap", "completed"),
        ("after", "completed"),
        ("short", "completed"),
    ]
