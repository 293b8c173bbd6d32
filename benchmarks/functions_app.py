"""The app of ``benchmarks/functions_bench.py``: one durable function of 3
steps, started by the event ``bench/order``.

The steps are :func:`functions_work.prepare`, :func:`~functions_work.charge`
and :func:`~functions_work.notify`, the same code the DBOS workflow of the
comparison runs. Configured from the environment (set by
``functions_bench.py``):

``BENCH_DB_URL``        SQLAlchemy URL (required)
``BENCH_WORKERS``       ``DURABLE_WORKERS`` (8)
``BENCH_POLL``          ``DURABLE_POLL_INTERVAL`` (1)
``BENCH_SCHEDULER``     ``DURABLE_SCHEDULER``: ``1`` or ``0`` (1)
``BENCH_CPROFILE_OUT``  write a cProfile (thread CPU) of the resuming threads
                        to this JSON file at exit (diagnostics)

The sender (``functions_bench.py``) builds it in its own process with the
scheduler off and posts the events to ``/durable/events``; the workers are
``flask --app functions_app:create_app durable worker`` from ``benchmarks/``.
Everything else keeps flask-durable's defaults (``DURABLE_CHECKPOINT="sync"``).
"""

from __future__ import annotations

import atexit
import json
import os
import sys
from typing import Any

from flask import Flask

from flask_durable import Durable, step

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

from functions_work import (  # noqa: E402 (after the path is set)
    EVENT_KEY,
    EVENT_NAME,
    FUNCTION_ID,
    charge,
    notify,
    prepare,
)


def create_app() -> Flask:
    env = os.environ
    app = Flask("functions_app")
    app.config.update(
        SECRET_KEY="bench",
        DURABLE_DATABASE_URI=env["BENCH_DB_URL"],
        DURABLE_WORKERS=int(env.get("BENCH_WORKERS", "8")),
        DURABLE_POLL_INTERVAL=float(env.get("BENCH_POLL", "1")),
        DURABLE_SCHEDULER=env.get("BENCH_SCHEDULER", "1") == "1",
        DURABLE_EVENT_KEY=EVENT_KEY,
    )
    durable = Durable(app)

    @durable.function(FUNCTION_ID, event=EVENT_NAME)
    def three_steps(event: dict[str, Any]) -> dict[str, Any]:
        order = step.run("prepare", prepare, event["data"]["n"])
        receipt = step.run("charge", charge, order)
        sent = step.run("notify", notify, order, receipt)
        return {"order": order["order"], "ref": sent["ref"]}

    _diagnostics()
    return app


def _diagnostics() -> None:
    out = os.environ.get("BENCH_CPROFILE_OUT")
    if not out:
        return
    from suspend import ThreadCPUProfile

    prof = ThreadCPUProfile()
    prof.install()

    def dump() -> None:
        with open(out, "w") as f:
            json.dump(prof.report(), f)

    atexit.register(dump)
