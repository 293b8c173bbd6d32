"""Leases and fencing: a stalled process cannot overwrite the new owner."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
from flask import Flask, jsonify

from flask_durable import Durable, step

durable = Durable()


@pytest.fixture
def db_url(any_db_url: str) -> str:
    return any_db_url


def routes(app: Flask, name: str, gate: threading.Event) -> Flask:
    @app.post("/work")
    @durable.endpoint
    def work() -> Any:
        first = step.run("first", lambda: name)
        second = step.run("second", lambda: gate.wait(20) and name)
        return jsonify(first=first, second=second, by=name)

    return app


def test_stalled_owner_cannot_overwrite_new_owner(
    make_app: Any, live_server: Any
) -> None:
    stalled_gate = threading.Event()
    # "a" stalls: once its run started, its heartbeat is stopped below, so
    # nothing renews the lease while the step hangs.
    a = routes(
        make_app(DURABLE_SCHEDULER=False, DURABLE_LEASE_SECONDS=1), "a", stalled_gate
    )
    b_gate = threading.Event()
    b_gate.set()
    b = routes(make_app(DURABLE_LEASE_SECONDS=1), "b", b_gate)
    server_a = live_server(a)
    server_b = live_server(b)
    out: dict[str, Any] = {}
    client = threading.Thread(
        target=lambda: out.update(r=server_a.post("/work", allow_redirects=False))
    )
    client.start()
    time.sleep(0.3)
    b.extensions["durable"].ensure_ready()  # b's sweeper takes over once expired
    run_id = None
    for _ in range(100):
        with b.app_context():
            runs = [r for r in a.extensions["durable"].active]
        if runs:
            run_id = runs[0]
            break
        time.sleep(0.05)
    assert run_id is not None
    a.extensions["durable"].scheduler.shutdown()
    for _ in range(200):
        with b.app_context():
            info = durable.get_run(run_id)
        if info is not None and info.is_terminal:
            break
        time.sleep(0.05)
    assert info is not None and info.status == "completed"
    stalled_gate.set()  # the stalled process wakes up late and tries to write
    client.join(10)
    late = out["r"]
    assert late.status_code == 303  # sent on to where the run finished
    final = server_b.get(late.headers["Location"])
    assert final.json() == {"first": "a", "second": "b", "by": "b"}
    with b.app_context():
        info = durable.get_run(run_id)
    assert info is not None
    assert [(s.id, s.output) for s in info.steps] == [("first", "a"), ("second", "b")]
    assert info.response is not None
    assert b'"by":"b"' in info.response[2]
