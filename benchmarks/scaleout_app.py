"""The app that ``benchmarks/scaleout.py`` runs in its child processes.

Configured from the environment (set by ``scaleout.py``):

``BENCH_DB_URL``        SQLAlchemy URL (required)
``BENCH_WORKERS``       ``DURABLE_WORKERS`` (8)
``BENCH_LEASE``         ``DURABLE_LEASE_SECONDS`` (15)
``BENCH_POLL``          ``DURABLE_POLL_INTERVAL`` (1)
``BENCH_SCHEDULER``     ``DURABLE_SCHEDULER``: ``1`` or ``0`` (1)
``BENCH_BARRIER_DIR``   where ``/recover``'s second step leaves its marker
                        and waits for its release file
``BENCH_SAMPLE_OUT``    write a stack-sample profile of the resuming threads
                        to this JSON file at exit (diagnostics)
``BENCH_CPROFILE_OUT``  write a cProfile (thread CPU) of the resuming threads
                        to this JSON file at exit (diagnostics)

Run as a server: ``python benchmarks/scaleout_app.py serve PORT`` (Werkzeug,
threaded); as a worker: ``flask --app scaleout_app:create_app durable worker``
from ``benchmarks/``.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import os
import sys
import time
from datetime import datetime, timezone
from typing import Any

from flask import Flask, jsonify, request

from flask_durable import Durable, current_run, step

HERE = os.path.dirname(os.path.abspath(__file__))


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


def blocking_step(run_id: str) -> dict[str, Any]:
    """Leaves ``<run>.<pid>.started`` and waits for ``<run>.release``."""
    barrier = os.environ["BENCH_BARRIER_DIR"]
    with open(os.path.join(barrier, f"{run_id}.{os.getpid()}.started"), "w") as f:
        f.write(str(time.time()))
    release = os.path.join(barrier, f"{run_id}.release")
    while not os.path.exists(release):
        time.sleep(0.005)
    return {"pid": os.getpid(), "t": time.time()}


def create_app() -> Flask:
    env = os.environ
    app = Flask("scaleout_app")
    app.config.update(
        SECRET_KEY="bench",
        DURABLE_DATABASE_URI=env["BENCH_DB_URL"],
        DURABLE_WORKERS=int(env.get("BENCH_WORKERS", "8")),
        DURABLE_LEASE_SECONDS=float(env.get("BENCH_LEASE", "15")),
        DURABLE_POLL_INTERVAL=float(env.get("BENCH_POLL", "1")),
        DURABLE_SCHEDULER=env.get("BENCH_SCHEDULER", "1") == "1",
    )
    durable = Durable(app)

    @app.get("/health")
    def health() -> Any:
        return {"pid": os.getpid()}

    @app.post("/recover")
    @durable.endpoint
    def recover() -> Any:
        first = step.run("first", lambda: {"pid": os.getpid()})
        second = step.run("second", blocking_step, current_run.id)
        return jsonify(first=first, second=second)

    @app.post("/work")
    @durable.endpoint
    def work() -> Any:
        body = request.get_json()
        order = step.run("prepare", prepare, body["n"])
        step.sleep_until("wait", datetime.fromtimestamp(body["until"], timezone.utc))
        receipt = step.run("charge", charge, order)
        sent = step.run("notify", notify, order, receipt)
        return jsonify(order=order, receipt=receipt, notification=sent)

    _diagnostics()
    return app


def _diagnostics() -> None:
    sample_out = os.environ.get("BENCH_SAMPLE_OUT")
    cprofile_out = os.environ.get("BENCH_CPROFILE_OUT")
    if not (sample_out or cprofile_out):
        return
    if HERE not in sys.path:
        sys.path.insert(0, HERE)
    from suspend import StackSampler, ThreadCPUProfile

    if sample_out:
        sampler = StackSampler(("durable-resume", "ThreadPoolExecutor", "APScheduler"))
        sampler.start()

        def dump_samples() -> None:
            sampler.stop()
            with open(sample_out, "w") as f:
                json.dump(sampler.report(), f)

        atexit.register(dump_samples)
    if cprofile_out:
        prof = ThreadCPUProfile()
        prof.install()

        def dump_profile() -> None:
            with open(cprofile_out, "w") as f:
                json.dump(prof.report(), f)

        atexit.register(dump_profile)


def serve(port: int) -> None:
    from werkzeug.serving import make_server

    app = create_app()
    server = make_server("127.0.0.1", port, app, threaded=True)
    print(f"serving on {port} pid {os.getpid()}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "serve":
        serve(int(sys.argv[2]))
    else:
        sys.exit("usage: scaleout_app.py serve PORT")
