"""The trip-booking example, end to end over real HTTP."""

from __future__ import annotations

import importlib.util
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from flask import Flask

EXAMPLE = Path(__file__).parent.parent / "examples" / "trip_booking" / "app.py"

FAST = {
    "DURABLE_RETRY_BACKOFF": 0.05,
    "DURABLE_RETRY_BACKOFF_MAX": 0.2,
    "DURABLE_POLL_INTERVAL": 0.2,
    "DURABLE_WAIT_TIMEOUT": 1,  # the "still waiting" poll below takes this long
}


@pytest.fixture
def example(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """``examples/trip_booking/app.py``, imported as ``trip_booking_app``."""
    spec = importlib.util.spec_from_file_location("trip_booking_app", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def trip_app(example: ModuleType, tmp_path: Path) -> Iterator[Flask]:
    """The example app, its database under ``tmp_path``, and a payment
    provider that fails every first attempt (so the retry always happens)."""
    app: Flask = example.create_app(
        {**FAST, "PAYMENT_FAILURE_RATE": 1.0, "PAYMENT_FLAKY_ATTEMPTS": 1},
        instance_path=str(tmp_path / "instance"),
    )
    yield app
    app.extensions["durable"].close()


def test_database_in_instance_path(trip_app: Flask, tmp_path: Path) -> None:
    """The example relies on the default database location."""
    assert trip_app.config["DURABLE_DATABASE_URI"] is None
    engine = trip_app.extensions["durable"].store.engine
    assert engine.url.database == str(tmp_path / "instance" / "durable.sqlite3")


def test_page(trip_app: Flask, live_server: Callable[[Flask], Any]) -> None:
    server = live_server(trip_app)
    r = server.get("/")
    assert r.status_code == 200
    assert "fetch(" in r.text and "business" in r.text


def test_trip_with_payment_retry(
    example: ModuleType, trip_app: Flask, live_server: Callable[[Flask], Any]
) -> None:
    server = live_server(trip_app)
    r = server.post("/trips", json={"cabin": "economy", "city": "Porto", "nights": 2})
    assert r.status_code == 200, r.text
    # The first charge attempt failed: the client was sent to the wait URL.
    assert [h.status_code for h in r.history] == [303]
    assert r.history[0].headers["Location"].startswith("/durable/wait/")
    trip = r.json()
    assert r.headers["Durable-Run-Id"] == trip["trip_id"]
    assert trip["flight"]["price"] == 420
    assert trip["payment"]["attempts"] == 2
    assert trip["approved_by"] is None
    assert trip["hotel"]["hotel"] == "Hotel Porto" and trip["hotel"]["nights"] == 2
    assert trip["car"]["pickup"] == "Porto"
    # One charge, even if the failed attempt had taken the money.
    charges = trip_app.extensions["payments"].charges
    assert list(charges.values()) == [
        {"charge_id": trip["payment"]["charge_id"], "amount": 420}
    ]
    with trip_app.app_context():
        run_info = example.durable.get_run(trip["trip_id"])
    assert run_info is not None and run_info.status == "completed"
    steps = {s.id: s for s in run_info.steps}
    assert steps["reserve-flight"].attempts == 1
    assert steps["charge-card"].attempts == 2
    assert {"book-hotel", "book-car"} <= steps.keys()


def test_bad_cabin_is_not_retried(
    trip_app: Flask, live_server: Callable[[Flask], Any]
) -> None:
    server = live_server(trip_app)
    r = server.post("/trips", json={"cabin": "cargo"})
    assert r.status_code == 400
    assert not r.history
    assert r.json()["error"] == "unknown cabin 'cargo'"


def test_expensive_trip_waits_for_approval(
    trip_app: Flask, live_server: Callable[[Flask], Any]
) -> None:
    server = live_server(trip_app)
    # Ask for the 202 instead of following the redirect, to approve meanwhile.
    r = server.post(
        "/trips", json={"cabin": "business"}, headers={"Prefer": "respond-async"}
    )
    assert r.status_code == 202, r.text
    assert r.json()["status"] == "waiting"
    trip_id = r.headers["Durable-Run-Id"]
    wait_url = r.headers["Location"]
    assert server.get("/approvals").json() == [{"trip_id": trip_id, "price": 2900}]

    # Still waiting: the wait URL answers 202 again when asked to be async.
    r = server.get(wait_url, headers={"Prefer": "respond-async"})
    assert r.status_code == 202
    assert r.json() == {"run_id": trip_id, "status": "waiting"}

    # Another trip's approval does not resume this one.
    assert server.post("/trips/someone-else/approve").status_code == 202

    r = server.post(f"/trips/{trip_id}/approve")
    assert r.status_code == 202
    assert r.json()["trip_id"] == trip_id

    r = server.get(wait_url)  # follows 303s until the run is finished
    assert r.status_code == 200, r.text
    trip = r.json()
    assert trip["trip_id"] == trip_id
    assert trip["approved_by"] == "manager"
    assert trip["payment"]["amount"] == 2900
    assert trip["hotel"]["hotel"] == "Hotel Lisbon"
    assert server.get("/approvals").json() == []


def test_approval_timeout_releases_flight(
    example: ModuleType, trip_app: Flask, live_server: Callable[[Flask], Any]
) -> None:
    trip_app.config["TRIP_APPROVAL_TIMEOUT"] = "0.5s"
    server = live_server(trip_app)
    started = time.monotonic()
    r = server.post("/trips", json={"cabin": "business"})
    assert r.status_code == 408, r.text
    assert r.json()["error"] == "not approved in time"
    assert time.monotonic() - started >= 0.5
    assert [h.status_code for h in r.history] == [303]
    with trip_app.app_context():
        run_info = example.durable.get_run(r.json()["trip_id"])
    assert run_info is not None
    steps = {s.id: s for s in run_info.steps}
    assert steps["manager-approval"].output is None
    assert steps["release-flight"].output == {"released": "TP1234"}
    assert "charge-card" not in steps


# -- examples/signup ------------------------------------------------------------

SIGNUP = Path(__file__).parent.parent / "examples" / "signup" / "app.py"


def test_signup_example(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, live_server: Any
) -> None:
    """Two signups, one deleted during its "day": one user gets both emails,
    the other only the welcome; a user who opted out gets nothing."""
    spec = importlib.util.spec_from_file_location("signup_app", SIGNUP)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)
    monkeypatch.chdir(tmp_path)
    spec.loader.exec_module(module)
    app: Flask = module.create_app(
        {**FAST, "WELCOME_DELAY": 1.0}, instance_path=str(tmp_path / "instance")
    )
    try:
        server = live_server(app)
        ann = server.post("/signup", json={"email": "ann@example.com"})
        bob = server.post("/signup", json={"email": "bob@example.com"})
        server.post("/signup", json={"email": "cy@example.com", "newsletter": False})
        assert ann.status_code == bob.status_code == 201
        bob_id = bob.json()["user_id"]

        def sent(to: str) -> list[str]:
            return [m["subject"] for m in module.OUTBOX if m["to"] == to]

        end = time.monotonic() + 10
        while not (sent("ann@example.com") and sent("bob@example.com")):
            assert time.monotonic() < end, module.OUTBOX
            time.sleep(0.05)
        assert server.post(f"/users/{bob_id}/delete", json={}).status_code == 200
        while len(sent("ann@example.com")) < 2:
            assert time.monotonic() < end, module.OUTBOX
            time.sleep(0.05)
        time.sleep(1.2)  # bob's "day" is over too
        assert sent("ann@example.com") == ["Welcome!", "Three tips for your first week"]
        assert sent("bob@example.com") == ["Welcome!"]
        assert sent("cy@example.com") == []
        with app.app_context():
            runs, _ = module.durable.list_runs(endpoint="send-welcome")
        assert sorted(r.status.value for r in runs) == ["cancelled", "completed"]
        assert server.get("/").status_code == 200
    finally:
        app.extensions["durable"].close()
