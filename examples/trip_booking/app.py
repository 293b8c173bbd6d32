"""Trip booking: a durable endpoint with retries, an approval and parallel steps.

Run it from this directory with ``flask --app app run`` (or ``make demo`` from
the repository root), then open http://127.0.0.1:5000/. Runs are kept in
``instance/durable.sqlite3`` (the default database of flask-durable).

The "airline", "payment provider", "hotel" and "car rental" below are fakes
that live in this process. The payment provider is flaky on purpose: it fails
about 30% of its first attempts, sometimes *after* taking the money, so the
charge step passes ``current_step.idempotency_key`` to it.
"""

from __future__ import annotations

import os
import random
import secrets
import threading
from typing import Any

from flask import Flask, current_app, jsonify, render_template, request, url_for

from flask_durable import (
    Durable,
    NonRetriableError,
    StepError,
    current_run,
    current_step,
    step,
)

durable = Durable()

#: Flight fares per cabin; trips above ``TRIP_APPROVAL_LIMIT`` need a manager.
FARES = {"economy": 420, "premium": 980, "business": 2900}


class FlakyPaymentProvider:
    """A fake payment API that fails some of the first attempts of a charge.

    A failure may happen after the card was charged (the reply got lost), the
    kind of failure that makes a naive retry charge twice. The provider
    remembers charges by idempotency key, as real payment APIs do, so a
    retry with the same key returns the original charge.
    """

    def __init__(self, failure_rate: float, flaky_attempts: int) -> None:
        self.failure_rate = failure_rate
        self.flaky_attempts = flaky_attempts
        self.charges: dict[str, dict[str, Any]] = {}
        self._lock = threading.Lock()

    def charge(self, amount: int, idempotency_key: str, attempt: int) -> dict[str, Any]:
        flaky = attempt < self.flaky_attempts and random.random() < self.failure_rate
        if flaky and random.random() < 0.5:
            raise ConnectionError("payment provider unreachable")
        with self._lock:
            charge = self.charges.setdefault(
                idempotency_key,
                {"charge_id": "ch_" + secrets.token_hex(6), "amount": amount},
            )
        if flaky:
            raise TimeoutError("payment provider timed out (card was charged)")
        return charge


# -- the other fake services: plain functions, each called through step.run ---


def reserve_flight(flight: str, cabin: str) -> dict[str, Any]:
    if cabin not in FARES:
        # Retrying cannot fix a bad request: fail the step at once.
        raise NonRetriableError(f"unknown cabin {cabin!r}")
    return {"flight": flight, "cabin": cabin, "seat": "14A", "price": FARES[cabin]}


def release_flight(flight: dict[str, Any]) -> dict[str, Any]:
    return {"released": flight["flight"]}


def book_hotel(city: str, nights: int) -> dict[str, Any]:
    return {"hotel": f"Hotel {city}", "nights": nights, "confirmation": "H-1042"}


def book_car(city: str) -> dict[str, Any]:
    return {"car": "compact", "pickup": city, "confirmation": "C-7731"}


def create_app(
    config: dict[str, Any] | None = None, instance_path: str | None = None
) -> Flask:
    app = Flask(__name__, instance_path=instance_path)
    app.config.update(
        # Lets trusted systems send events with
        # POST /durable/events (Authorization: Bearer <key>); off when unset.
        DURABLE_EVENT_KEY=os.environ.get("DURABLE_EVENT_KEY"),
        TRIP_APPROVAL_LIMIT=1000,
        # Browsers follow about 20 redirects of 25 s each (DURABLE_WAIT_TIMEOUT):
        # the page at / can wait about 8 minutes for the approval.
        TRIP_APPROVAL_TIMEOUT="5m",
        PAYMENT_FAILURE_RATE=float(os.environ.get("PAYMENT_FAILURE_RATE", "0.3")),
        PAYMENT_FLAKY_ATTEMPTS=2,
    )
    # No DURABLE_DATABASE_URI: runs go to a SQLite file in app.instance_path.
    app.config.update(config or {})
    durable.init_app(app)

    payments = FlakyPaymentProvider(
        app.config["PAYMENT_FAILURE_RATE"], app.config["PAYMENT_FLAKY_ATTEMPTS"]
    )
    app.extensions["payments"] = payments  # for the tests
    # The manager's "inbox" of trips to approve. A real app would send an
    # email with the approval link; here the page at / shows it.
    inbox: dict[str, dict[str, Any]] = {}

    def charge_card(amount: int) -> dict[str, Any]:
        # Inside a step function: current_step.idempotency_key is the same
        # on every attempt of this step in this run.
        charge = payments.charge(
            amount, current_step.idempotency_key, current_step.attempt
        )
        return {**charge, "attempts": current_step.attempt + 1}

    def notify_manager(trip_id: str, flight: dict[str, Any]) -> str:
        approve_url = url_for("approve_trip", trip_id=trip_id, _external=True)
        inbox[trip_id] = {"trip_id": trip_id, "price": flight["price"]}
        current_app.logger.warning(
            "trip %s needs approval: curl -X POST %s", trip_id, approve_url
        )
        return approve_url

    @app.get("/")
    def index() -> str:
        return render_template("index.html", fares=FARES)

    @app.post("/trips")
    @durable.endpoint
    def book_trip() -> Any:
        # This view runs again from the top each time the run resumes (after
        # a retry, or once the approval arrives). Completed steps return
        # their stored result without running again.
        body = request.get_json(force=True, silent=True) or {}
        trip_id = current_run.id  # also sent as the Durable-Run-Id header
        city = body.get("city", "Lisbon")

        try:
            flight = step.run(
                "reserve-flight",
                reserve_flight,
                body.get("flight", "TP1234"),
                body.get("cabin", "economy"),
            )
        except StepError as e:  # the step failed for good
            return jsonify(trip_id=trip_id, error=e.error_message), 400

        approval = None
        if flight["price"] > current_app.config["TRIP_APPROVAL_LIMIT"]:
            step.run("notify-manager", notify_manager, trip_id, flight)
            # Suspends the run (no thread is held) until an event
            # "trip/approved" with data.trip_id == trip_id is sent.
            approval = step.wait_for_event(
                "manager-approval",
                event="trip/approved",
                match={"data.trip_id": trip_id},
                timeout=current_app.config["TRIP_APPROVAL_TIMEOUT"],
            )
            inbox.pop(trip_id, None)
            if approval is None:
                step.run("release-flight", release_flight, flight)
                return jsonify(trip_id=trip_id, error="not approved in time"), 408

        # Retried with backoff when the provider fails; the reserve step
        # above does not run again.
        payment = step.run("charge-card", charge_card, flight["price"])

        # Both bookings run at the same time; each one is its own step.
        hotel, car = step.parallel(
            lambda: step.run("book-hotel", book_hotel, city, body.get("nights", 3)),
            lambda: step.run("book-car", book_car, city),
        )
        return jsonify(
            trip_id=trip_id,
            flight=flight,
            payment=payment,
            approved_by=approval["data"].get("by", "unknown") if approval else None,
            hotel=hotel,
            car=car,
        )

    @app.get("/approvals")
    def pending_approvals() -> Any:
        return jsonify(list(inbox.values()))

    @app.post("/trips/<trip_id>/approve")
    def approve_trip(trip_id: str) -> Any:
        # Resumes the run waiting for this trip's approval, if any.
        event_id = durable.send("trip/approved", {"trip_id": trip_id, "by": "manager"})
        inbox.pop(trip_id, None)
        return jsonify(trip_id=trip_id, event_id=event_id), 202

    return app
