"""The app of tests/test_dashboard.py and tests/test_dashboard_browser.py
(and of docs/screenshot.py): runs that retried, failed, sleep, wait for an
event, and return whatever a client sent. Not a test module (no ``test_``
prefix).

The dashboard lets in requests carrying the cookie ``ADMIN_COOKIE`` with
the value ``ADMIN_SECRET``.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

from flask import Flask, jsonify, request

from flask_durable import Durable, step

durable = Durable()

ADMIN_COOKIE = "durable_admin"
ADMIN_SECRET = "let-me-in"

#: Whether step "charge" of /broken works (it fails for good until then).
FIXED = {"charge": False}
#: Once fixed, step "charge" of /broken holds until this is set (so a page
#: can be seen while the retried run is going).
GATE = threading.Event()
#: How many times each step function ran.
calls: Counter[str] = Counter()

TEST_CONFIG: dict[str, Any] = {
    "SECRET_KEY": "test-secret",
    "DURABLE_RETRY_BACKOFF": 0.05,
    "DURABLE_RETRY_BACKOFF_MAX": 0.2,
    "DURABLE_POLL_INTERVAL": 0.2,
    "DURABLE_WAIT_TIMEOUT": 10,
    "DURABLE_LEASE_SECONDS": 3,
}


@durable.dashboard_auth
def _is_admin() -> bool:
    return request.cookies.get(ADMIN_COOKIE) == ADMIN_SECRET


def reset() -> None:
    """Forget the calls of earlier tests; break step "charge" again."""
    FIXED["charge"] = False
    GATE.clear()
    calls.clear()


def _count(name: str) -> int:
    calls[name] += 1
    return calls[name]


def _gateway(order: str) -> dict[str, Any]:
    """Fails on its first two calls for an order, then charges."""
    n = _count(f"charge:{order}")
    if n <= 2:
        raise ConnectionError(f"payment gateway timed out (call {n})")
    return {"charged": True, "amount": 4200, "currency": "EUR", "order": order}


def _broken_charge() -> str:
    _count("broken")
    if not FIXED["charge"]:
        raise RuntimeError("card processor misconfigured")
    GATE.wait(10)
    return "charged"


def build_app(db_path: Path, **config: Any) -> Flask:
    """An app with the dashboard on a SQLite file; close it with
    ``app.extensions["durable"].close()``."""
    app = Flask("dashboard_test", instance_path=str(db_path.parent / "instance"))
    app.config.update(TEST_CONFIG, DURABLE_DATABASE_URI=f"sqlite:///{db_path}")
    app.config.update(config)
    durable.init_app(app)

    @app.post("/order")
    @durable.endpoint(retries=3)
    def order() -> Any:
        body = request.get_json(silent=True) or {}
        order_id = str(body.get("order", "A-1"))
        held = step.run("reserve", lambda: {"order": order_id, "held": True})
        charge = step.run("charge", _gateway, order_id)
        step.sleep("cool-off", body.get("sleep", 0.3))
        receipt = step.run("receipt", lambda: f"R-{order_id}")
        return jsonify(order=held, charge=charge, receipt=receipt)

    @app.post("/broken")
    @durable.endpoint(retries=1)
    def broken() -> Any:
        step.run("prepare", lambda: "prepared")
        charged = step.run("charge", _broken_charge)
        return jsonify(charged=charged)

    @app.post("/nap")
    @durable.endpoint
    def nap() -> Any:
        step.run("start", lambda: "started")
        step.sleep("nap", "1h")
        return jsonify(woke=True)

    @app.post("/three")
    @durable.endpoint
    def three() -> Any:
        a = step.run("a", _count, "a")
        b = step.run("b", _count, "b")
        c = step.run("c", _count, "c")
        return jsonify(a=a, b=b, c=c)

    @app.post("/approve")
    @durable.endpoint
    def approve() -> Any:
        event = step.wait_for_event("approval", event="order.approved", timeout="1h")
        return jsonify(approved=event is not None and event["data"])

    @app.post("/echo")
    @durable.endpoint
    def echo() -> Any:
        text = request.get_data(as_text=True)
        return jsonify(said=step.run("said", lambda: text))

    return app


def wait_status(app: Flask, run_id: str, status: str, timeout: float = 15) -> Any:
    """The run once it has ``status`` (fails after ``timeout`` seconds)."""
    end = time.monotonic() + timeout
    while True:
        with app.app_context():
            info = durable.get_run(run_id)
        if info is not None and info.status == status:
            return info
        assert time.monotonic() < end, f"run {run_id} is {info and info.status}"
        time.sleep(0.05)
