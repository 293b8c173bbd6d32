"""The app that docs/testing.rst tests: a trip booked with an approval."""

from __future__ import annotations

from typing import Any

from flask import Flask, jsonify, request

from flask_durable import Durable, step

durable = Durable()


def reserve_seat(trip: str) -> dict[str, Any]:
    return {"trip": trip, "seat": "14A"}  # a call to the airline's API


def charge_card(amount: int) -> dict[str, Any]:
    return {"charged": amount}  # a call to the payment provider


def create_app(config: dict[str, Any] | None = None) -> Flask:
    app = Flask(__name__)
    app.config.update(config or {})
    durable.init_app(app)

    @app.post("/trips")
    @durable.endpoint
    def book() -> Any:
        trip = request.get_json()["trip"]
        seat = step.run("reserve", reserve_seat, trip)
        step.sleep("cooling-off", "1d")
        approval = step.wait_for_event(
            "approval", event="trip/approved", match={"data.trip": trip}, timeout="7d"
        )
        if approval is None:
            return jsonify(status="expired"), 410
        charge = step.run("charge", charge_card, 420)
        return jsonify(status="booked", seat=seat, charge=charge)

    return app
