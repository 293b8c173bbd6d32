"""Events over real HTTP: ``step.wait_for_event`` resumed by a matching
event, its timeout, the events route (auth, validation, dedup by id), and
matching on dotted paths."""

from __future__ import annotations

import time
from collections import Counter
from typing import Any

import pytest
from suspend_app import EVENT_KEY, _post_event, build

from flask_durable.events import matches


@pytest.fixture
def db_url(any_db_url: str) -> str:
    """Every test here runs on SQLite and on PostgreSQL."""
    return any_db_url


def test_approval_flow_resumed_by_event(make_app: Any, live_server: Any) -> None:
    # A short long-poll: the poll below that finds the run still waiting
    # answers after 0.5 s, not the default 10 s.
    app, calls = build(make_app, DURABLE_WAIT_TIMEOUT=0.5)
    server = live_server(app)
    r = server.post("/approve/42", allow_redirects=False)
    assert r.status_code == 303
    assert r.json()["status"] == "waiting"
    location = r.headers["Location"]

    # A non-matching event and an event of another name are ignored.
    assert (
        _post_event(
            server, {"name": "approval/received", "data": {"booking_id": 7}}
        ).status_code
        == 202
    )
    assert (
        _post_event(server, {"name": "other", "data": {"booking_id": 42}}).status_code
        == 202
    )
    pending = server.get(
        location, headers={"Prefer": "respond-async"}, allow_redirects=False
    )
    # Still waiting: neither event matched.
    assert pending.status_code == 202
    assert pending.json() == {"run_id": r.json()["run_id"], "status": "waiting"}
    assert pending.headers["Location"] == location
    assert calls["confirm"] == 0

    sent = _post_event(
        server,
        [
            {
                "name": "approval/received",
                "data": {"booking_id": 42, "by": "ann"},
                "id": "ev-1",
            }
        ],
    )
    assert sent.status_code == 202
    assert sent.json() == {"ids": ["ev-1"]}
    final = server.get(location)
    assert final.status_code == 200
    approval = final.json()["approval"]
    assert approval["name"] == "approval/received"
    assert approval["data"] == {"booking_id": 42, "by": "ann"}
    assert approval["id"] == "ev-1"
    assert isinstance(approval["ts"], int)
    assert calls == Counter(reserve=1, confirm=1)


def test_event_before_wait_began_does_not_match(
    make_app: Any, live_server: Any
) -> None:
    app, _ = build(make_app)
    server = live_server(app)
    _post_event(server, {"name": "approval/received", "data": {"booking_id": 5}})
    r = server.post("/approve/5?timeout=1s")
    assert r.status_code == 408
    assert r.json() == {"error": "not approved in time"}


def test_wait_timeout_returns_none(make_app: Any, live_server: Any) -> None:
    app, calls = build(make_app)
    server = live_server(app)
    began = time.time()
    r = server.post("/approve/9?timeout=1s")
    assert r.status_code == 408
    assert time.time() - began >= 1.0
    assert calls["confirm"] == 0


def test_events_route_auth_and_validation(make_app: Any, live_server: Any) -> None:
    app, _ = build(make_app)
    server = live_server(app)
    ok = {"name": "x"}
    assert _post_event(server, ok, key=None).status_code == 401
    assert _post_event(server, ok, key="wrong").status_code == 401
    bad = server.post(
        "/durable/events",
        data=b"{not json",
        headers={
            "Authorization": f"Bearer {EVENT_KEY}",
            "Content-Type": "application/json",
        },
    )
    assert bad.status_code == 400
    assert "error" in bad.json()
    for payload in (
        {"data": {}},
        {"name": ""},
        {"name": "x", "data": [1]},
        {"name": 3},
        [],
        {"name": "x", "id": 5},
        "text",
    ):
        r = _post_event(server, payload)
        assert r.status_code == 400, payload
        assert "error" in r.json()
    r = _post_event(server, [{"name": "a"}, {"name": "b", "id": "dup"}])
    assert r.status_code == 202
    assert len(r.json()["ids"]) == 2


def test_events_route_is_404_without_key(make_app: Any, live_server: Any) -> None:
    app, _ = build(make_app, DURABLE_EVENT_KEY=None)
    server = live_server(app)
    r = _post_event(server, {"name": "x"})
    assert r.status_code == 404


def test_event_id_deduplicates(make_app: Any, live_server: Any) -> None:
    app, calls = build(make_app)
    server = live_server(app)
    first = server.post("/approve/1", allow_redirects=False)
    second = server.post("/approve/1", allow_redirects=False)
    # The same event id twice: stored and delivered once.
    payload = {"name": "approval/received", "data": {"booking_id": 1}, "id": "same"}
    assert _post_event(server, payload).json() == {"ids": ["same"]}
    assert server.get(first.headers["Location"]).status_code == 200
    assert server.get(second.headers["Location"]).status_code == 200
    third = server.post("/approve/1?timeout=1s", allow_redirects=False)
    _post_event(server, payload)  # duplicate id: ignored, does not resume
    assert server.get(third.headers["Location"]).status_code == 408


def test_matches_dotted_paths() -> None:
    event = {"name": "n", "data": {"a": {"b": 1}, "flag": True, "items": [5, 6]}}
    assert matches({}, event)
    assert matches({"data.a.b": 1, "name": "n"}, event)
    assert matches({"data.items.1": 6}, event)
    assert not matches({"data.a.b": 2}, event)
    assert not matches({"data.missing": None}, event)
    assert not matches({"data.flag": 1}, event)  # True is not 1 here
