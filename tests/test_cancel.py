"""Cancellation over real HTTP: ``durable.cancel`` of a sleeping or a running
run, and the endpoint ``timeout`` (``504``)."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
from suspend_app import build, durable


@pytest.fixture
def db_url(any_db_url: str) -> str:
    """Every test here runs on SQLite and on PostgreSQL."""
    return any_db_url


def test_cancel_sleeping_run(make_app: Any, live_server: Any) -> None:
    app, calls = build(make_app)
    server = live_server(app)
    r = server.post("/nap?for=30s", allow_redirects=False)
    run_id = r.headers["Durable-Run-Id"]
    assert server.post(f"/cancel/{run_id}").json() == {"cancelled": True}
    final = server.get(r.headers["Location"])
    assert final.status_code == 409
    assert final.json()["run_id"] == run_id
    assert calls["after"] == 0
    assert server.post(f"/cancel/{run_id}").json() == {"cancelled": False}
    with app.app_context():
        info = durable.get_run(run_id)
    assert info is not None and info.status == "cancelled"


def test_cancel_running_run_stops_at_next_step(make_app: Any, live_server: Any) -> None:
    app, calls = build(make_app)
    server = live_server(app)
    result: dict[str, Any] = {}

    def call() -> None:
        result["r"] = server.post("/slow-steps")

    client = threading.Thread(target=call)
    client.start()
    for _ in range(100):
        if calls["one"]:
            break
        time.sleep(0.05)
    state = app.extensions["durable"]
    run_id = next(iter(state.active))
    assert server.post(f"/cancel/{run_id}").json() == {"cancelled": True}
    app.config["gate"].set()
    client.join(10)
    r = result["r"]
    assert r.status_code == 409
    assert r.json()["run_id"] == run_id
    assert calls["two"] == 0


def test_endpoint_timeout_cancels_with_504(make_app: Any, live_server: Any) -> None:
    app, _ = build(make_app)
    server = live_server(app)
    began = time.time()
    r = server.post("/deadline")
    assert r.status_code == 504
    assert time.time() - began < 10
