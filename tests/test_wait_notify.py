"""PostgreSQL LISTEN/NOTIFY: wait URLs and event waiters in one process are
woken by work done in another, without waiting for a poll."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
from flask import Flask, jsonify

from flask_durable import Durable, step

pytestmark = pytest.mark.postgres
durable = Durable()
KEY = "k"


@pytest.fixture
def db_url(any_db_url: str) -> str:
    if any_db_url.startswith("sqlite"):
        pytest.skip("LISTEN/NOTIFY is PostgreSQL only")
    return any_db_url


def routes(app: Flask) -> Flask:
    @app.post("/approve/<int:n>")
    @durable.endpoint
    def approve(n: int) -> Any:
        event = step.wait_for_event(
            "ok", event="approved", match={"data.n": n}, timeout="1m"
        )
        return jsonify(by=event["data"]["by"] if event else None)

    return app


def test_wait_url_and_event_wake_across_processes(
    make_app: Any, live_server: Any
) -> None:
    # "web": serves requests, runs no scheduler, polls rarely.
    web = routes(
        make_app(
            DURABLE_SCHEDULER=False, DURABLE_POLL_INTERVAL=5, DURABLE_EVENT_KEY=KEY
        )
    )
    # "worker": resumes runs, sweeps rarely.
    worker = routes(make_app(DURABLE_POLL_INTERVAL=5))
    worker.extensions["durable"].ensure_ready()
    time.sleep(0.3)  # let the worker's first sweep pass
    server = live_server(web)
    r = server.post("/approve/3", allow_redirects=False)
    assert r.status_code == 303
    got: dict[str, Any] = {}

    def wait() -> None:
        got["r"] = server.get(r.headers["Location"])
        got["t"] = time.time()

    waiter = threading.Thread(target=wait)
    waiter.start()
    time.sleep(0.3)
    sent = time.time()
    assert (
        server.post(
            "/durable/events",
            json={"name": "approved", "data": {"n": 3, "by": "ann"}},
            headers={"Authorization": f"Bearer {KEY}"},
        ).status_code
        == 202
    )
    waiter.join(15)
    assert got["r"].status_code == 200
    assert got["r"].json() == {"by": "ann"}
    # Both processes poll every 5 s: only notifications make this quick.
    assert got["t"] - sent < 3.0
    run_id = r.headers["Durable-Run-Id"]
    with web.app_context():
        info = durable.get_run(run_id)
    assert info is not None and info.attempt == 1
