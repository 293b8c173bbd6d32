"""The wait URL: ``303`` and ``Prefer: respond-async`` (``202``), clients
that follow it, tokens, long-polls that end in a redirect to itself, and
waiters woken at once (not at the next poll)."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
import requests
from steps_app import build
from suspend_app import _post_event
from suspend_app import build as build_suspend


@pytest.fixture
def db_url(any_db_url: str) -> str:
    """Every test here runs on SQLite and on PostgreSQL."""
    return any_db_url


def test_redirect_following_client_gets_final_response(
    make_app: Any, live_server: Any
) -> None:
    app, calls = build(make_app)
    server = live_server(app)
    r = server.post("/retry")
    assert r.status_code == 200
    assert r.json()["second"] == "second-ok"
    assert r.history and r.history[0].status_code == 303


def test_prefer_respond_async(make_app: Any, live_server: Any) -> None:
    app, _ = build(make_app)
    server = live_server(app)
    r = server.post(
        "/retry", headers={"Prefer": "respond-async"}, allow_redirects=False
    )
    assert r.status_code == 202
    body = r.json()
    assert body["run_id"] == r.headers["Durable-Run-Id"]
    assert body["wait_url"] == r.headers["Location"]
    assert server.get(body["wait_url"]).json()["second"] == "second-ok"


def test_tampered_and_unknown_tokens_are_404_json(
    make_app: Any, live_server: Any
) -> None:
    app, _ = build(make_app)
    server = live_server(app)
    r = server.post("/retry", allow_redirects=False)
    location = r.headers["Location"]
    tampered = location[:-3] + ("aaa" if not location.endswith("aaa") else "bbb")
    for url in (tampered, "/durable/wait/nope", "/durable/wait/" + "x" * 500):
        bad = server.get(url)
        assert bad.status_code == 404
        assert bad.headers["Content-Type"] == "application/json"
        assert "error" in bad.json()
    server.get(location)


def test_wait_url_redirects_to_itself_while_running(
    make_app: Any, live_server: Any
) -> None:
    app, _ = build(
        make_app,
        DURABLE_WAIT_TIMEOUT=0.3,
        DURABLE_RETRY_BACKOFF=3,
        DURABLE_RETRY_BACKOFF_MAX=3,
    )
    server = live_server(app)
    r = server.post("/retry", allow_redirects=False)
    location = r.headers["Location"]
    again = server.get(location, allow_redirects=False)
    assert again.status_code == 303
    assert again.headers["Location"] == location
    polled = server.get(
        location, headers={"Prefer": "respond-async"}, allow_redirects=False
    )
    assert polled.status_code == 202
    assert polled.headers["Retry-After"]
    assert polled.json()["status"] in ("scheduled", "running")


def test_requests_session_follows_to_the_end(make_app: Any, live_server: Any) -> None:
    app, _ = build(make_app)
    server = live_server(app)
    with requests.Session() as s:
        r = s.post(server.url + "/retry", timeout=30)
    assert r.status_code == 200


def test_wait_url_wakes_without_polling_delay(make_app: Any, live_server: Any) -> None:
    app, _ = build_suspend(make_app, DURABLE_POLL_INTERVAL=5)
    server = live_server(app)
    r = server.post("/approve/77", allow_redirects=False)
    waited: dict[str, Any] = {}

    def wait() -> None:
        waited["r"] = server.get(r.headers["Location"])
        waited["t"] = time.time()

    waiter = threading.Thread(target=wait)
    waiter.start()
    time.sleep(0.3)
    sent_at = time.time()
    _post_event(server, {"name": "approval/received", "data": {"booking_id": 77}})
    waiter.join(10)
    assert waited["r"].status_code == 200
    # Poll interval is 5 s: a fast answer means the waiter was woken.
    assert waited["t"] - sent_at < 2.5
