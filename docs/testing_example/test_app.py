"""Tests of app.py with flask_durable.testing (see docs/testing.rst)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from app import create_app
from flask import Flask

from flask_durable import NonRetriableError
from flask_durable.testing import DurableTester


@pytest.fixture
def app(tmp_path) -> Iterator[Flask]:
    app = create_app({"DURABLE_DATABASE_URI": f"sqlite:///{tmp_path}/durable.db"})
    yield app
    app.extensions["durable"].close()


def test_booking(app: Flask, durable_tester: DurableTester) -> None:
    durable_tester.fail_step("reserve", times=2)
    client = app.test_client()

    # Retries and the day's sleep take no time; then the run waits.
    r = client.post("/trips", json={"trip": "LIS"}, follow_redirects=True)
    assert r.status_code == 202
    assert r.json["status"] == "waiting"

    durable_tester.send("trip/approved", {"trip": "LIS"})
    r = client.get(r.headers["Location"])
    assert r.json["status"] == "booked"

    run = durable_tester.get_run(r.headers["Durable-Run-Id"])
    assert run.steps[0].attempts == 3


def test_no_approval_within_a_week(app: Flask, durable_tester: DurableTester) -> None:
    r = app.test_client().post("/trips", json={"trip": "LIS"}, follow_redirects=True)
    durable_tester.advance("8d")
    r = app.test_client().get(r.headers["Location"])
    assert r.status_code == 410


def test_card_declined(app: Flask, durable_tester: DurableTester) -> None:
    durable_tester.fail_step("charge", error=NonRetriableError("card declined"))
    client = app.test_client()
    r = client.post("/trips", json={"trip": "LIS"}, follow_redirects=True)
    durable_tester.send("trip/approved", {"trip": "LIS"})
    run = durable_tester.get_run(r.headers["Durable-Run-Id"])
    assert run.status == "failed"
    assert "card declined" in run.error


def test_crash_after_reserving(app: Flask, durable_tester: DurableTester) -> None:
    durable_tester.mock_step("charge", {"charged": 0})
    durable_tester.crash_after("reserve")
    client = app.test_client()
    r = client.post("/trips", json={"trip": "LIS"})
    assert r.status_code == 303  # the process "died" after the seat was held

    r = client.get(r.headers["Location"])  # replayed: "reserve" is not run again
    durable_tester.send("trip/approved", {"trip": "LIS"})
    r = client.get(r.headers["Location"])
    assert r.json["charge"] == {"charged": 0}
    run = durable_tester.get_run(r.headers["Durable-Run-Id"])
    assert run.steps[0].id == "reserve" and run.steps[0].attempts == 1
