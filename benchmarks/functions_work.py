"""The work of ``benchmarks/functions_bench.py``: the event, the function's
id and the 3 steps that flask-durable (``functions_app.py``) and DBOS run
alike. Standard library only: the DBOS venv imports it too."""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

EVENT_NAME = "bench/order"
FUNCTION_ID = "bench-3-steps"
EVENT_KEY = "bench-functions-key"


def prepare(n: int) -> dict[str, Any]:
    return {"order": n, "sku": f"SKU-{n % 97:04d}", "qty": 1 + n % 3, "price": 19.5}


def charge(order: dict[str, Any]) -> dict[str, Any]:
    # A little CPU, like building and signing a payment request.
    payload = json.dumps(order, sort_keys=True).encode()
    digest = hashlib.sha256(payload).hexdigest()
    return {
        "charge_id": digest[:16],
        "amount": round(order["qty"] * order["price"], 2),
        "pid": os.getpid(),
    }


def notify(order: dict[str, Any], receipt: dict[str, Any]) -> dict[str, Any]:
    return {
        "sent": True,
        "to": f"customer-{order['order']}",
        "ref": receipt["charge_id"],
    }
