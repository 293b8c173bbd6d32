"""The apps of ``benchmarks/flow_bench.py`` (flow control).

:func:`endpoint_app` (in process, scenario 1): the same 3-step durable
endpoint four times, without limits (``/base/3``) and under limits that are
never reached: ``/concurrency/3`` (``concurrency={"limit": 1000, "key":
lambda r: "k"}``), ``/rate/3`` (``rate_limit``, 10^6 per second) and
``/throttle/3`` (``throttle``, 10^6 per second, burst 1000).

:func:`create_app` (scenario 2): one durable function, ``flow-drain``,
started by the event ``bench/flow``, of one trivial ``step.run``, with
``concurrency={"limit": BENCH_LIMIT}`` (none when ``BENCH_LIMIT`` is 0, the
yardstick). Its body appends ``S <event id> <pid> <time>`` to the ledger
before the step and ``E ...`` after it, one ``write`` on an ``O_APPEND``
file each, so that every start of a run is seen, replays included.
Configured from the environment (set by ``flow_bench.py``):

``BENCH_DB_URL``        SQLAlchemy URL (required)
``BENCH_LIMIT``         the concurrency limit, 0 for none (20)
``BENCH_LEDGER``        the ledger file (required for the function to run)
``BENCH_WORKERS``       ``DURABLE_WORKERS`` (16)
``BENCH_POLL``          ``DURABLE_POLL_INTERVAL`` (1)
``BENCH_SCHEDULER``     ``DURABLE_SCHEDULER``: ``1`` or ``0`` (1)
``BENCH_STATS_OUT``     diagnostics: count the calls, wall time and thread
                        CPU time of the store's claim and admission methods
                        (wrappers set on the app's store instance; the
                        library is not modified) and write them to this
                        JSON file at exit

The sender (``flow_bench.py``) builds it with the scheduler off and stores
the runs with ``send_events``; the workers are ``flask --app
flow_app:create_app durable worker`` from ``benchmarks/``.
"""

from __future__ import annotations

import atexit
import functools
import json
import os
import threading
import time
from typing import Any

from flask import Flask, jsonify

from flask_durable import Durable, step

FUNCTION_ID = "flow-drain"
EVENT_NAME = "bench/flow"
SECRET_KEY = "bench-secret"

#: Limits never reached by the in-process scenario (one request at a time).
NEVER_CONCURRENCY = {"limit": 1000, "key": lambda request: "k"}
NEVER_RATE = {"limit": 1_000_000, "period": "1s", "key": lambda request: "k"}
NEVER_THROTTLE = {
    "limit": 1_000_000,
    "period": "1s",
    "burst": 1000,
    "key": lambda request: "k",
}


def work(i: int) -> dict[str, Any]:
    """The body of a step: returns a small dict (as ``apps.work``)."""
    return {"i": i, "ok": True, "name": "step"}


def endpoint_app(uri: str, **config: Any) -> Flask:
    """Scenario 1: ``/base/<k>`` and the same endpoint under limits that are
    never reached, in one app (flask-durable's defaults otherwise)."""
    app = Flask("flow_endpoints")
    app.config.update(
        SECRET_KEY=SECRET_KEY,
        DURABLE_DATABASE_URI=uri,
        DURABLE_CHECKPOINT="sync",
    )
    app.config.update(config)
    durable = Durable(app)

    def body(k: int) -> Any:
        results = [step.run(f"s{i}", work, i) for i in range(k)]
        return jsonify(n=len(results), last=results[-1])

    @app.get("/base/<int:k>")
    @durable.endpoint
    def base(k: int) -> Any:
        return body(k)

    @app.get("/concurrency/<int:k>")
    @durable.endpoint(concurrency=NEVER_CONCURRENCY)
    def concurrency(k: int) -> Any:
        return body(k)

    @app.get("/rate/<int:k>")
    @durable.endpoint(rate_limit=NEVER_RATE)
    def rate(k: int) -> Any:
        return body(k)

    @app.get("/throttle/<int:k>")
    @durable.endpoint(throttle=NEVER_THROTTLE)
    def throttle(k: int) -> Any:
        return body(k)

    return app


class Ledger:
    """One ``O_APPEND`` file shared by every process: each line is written
    by one ``write`` call, so lines of concurrent writers never mix."""

    def __init__(self, path: str | None) -> None:
        self.path = path
        self.fd: int | None = None
        self.lock = threading.Lock()

    def write(self, kind: str, event_id: str) -> None:
        if self.path is None:
            raise RuntimeError("BENCH_LEDGER is not set")
        if self.fd is None:
            with self.lock:
                if self.fd is None:
                    self.fd = os.open(
                        self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644
                    )
        line = f"{kind} {event_id} {os.getpid()} {time.time():.6f}\n"
        os.write(self.fd, line.encode())


def create_app() -> Flask:
    """Scenario 2: the function ``flow-drain`` (see the module's doc)."""
    env = os.environ
    app = Flask("flow_app")
    app.config.update(
        SECRET_KEY=SECRET_KEY,
        DURABLE_DATABASE_URI=env["BENCH_DB_URL"],
        DURABLE_WORKERS=int(env.get("BENCH_WORKERS", "16")),
        DURABLE_POLL_INTERVAL=float(env.get("BENCH_POLL", "1")),
        DURABLE_SCHEDULER=env.get("BENCH_SCHEDULER", "1") == "1",
    )
    durable = Durable(app)
    limit = int(env.get("BENCH_LIMIT", "20"))
    ledger = Ledger(env.get("BENCH_LEDGER"))

    @durable.function(
        FUNCTION_ID,
        event=EVENT_NAME,
        concurrency={"limit": limit} if limit > 0 else None,
    )
    def drain(event: dict[str, Any]) -> dict[str, Any]:
        ledger.write("S", event["id"])
        out = step.run("work", work, event["data"]["n"])
        ledger.write("E", event["id"])
        return {"n": out["i"]}

    out = env.get("BENCH_STATS_OUT")
    if out:
        _instrument(app, out)
    return app


#: The store methods timed by ``BENCH_STATS_OUT``.
TIMED = (
    "admit",
    "_lock_key",
    "_running",
    "claim_due",
    "claim",
    "load_steps",
    "write",
    "write_batch",
    "upcoming",
    "renew",
)


def instrument(store: Any, names: tuple[str, ...] = TIMED) -> dict[str, Any]:
    """Wrap the methods ``names`` of one store instance (the library is not
    modified): the returned dict fills with, per method, ``calls``,
    ``wall_s``, ``cpu_s`` (thread CPU time) and, for methods returning a
    list, ``items`` and ``empty`` (calls that returned an empty list)."""
    stats: dict[str, dict[str, float]] = {}
    lock = threading.Lock()

    def wrap(name: str, fn: Any) -> Any:
        @functools.wraps(fn)
        def timed(*a: Any, **kw: Any) -> Any:
            w0, c0 = time.perf_counter(), time.thread_time()
            result = fn(*a, **kw)
            wall, cpu = time.perf_counter() - w0, time.thread_time() - c0
            with lock:
                s = stats.setdefault(
                    name, {"calls": 0, "wall_s": 0.0, "cpu_s": 0.0, "empty": 0}
                )
                s["calls"] += 1
                s["wall_s"] += wall
                s["cpu_s"] += cpu
                if isinstance(result, list):
                    s["items"] = s.get("items", 0) + len(result)
                    s["empty"] += not result
            return result

        return timed

    for name in names:
        setattr(store, name, wrap(name, getattr(store, name)))
    return stats


def uninstrument(store: Any, names: tuple[str, ...] = TIMED) -> None:
    """Remove :func:`instrument`'s wrappers (the class's methods again)."""
    for name in names:
        store.__dict__.pop(name, None)


def _instrument(app: Flask, out: str) -> None:
    stats = instrument(app.extensions["durable"].store)

    def dump() -> None:
        with open(out, "w") as f:
            json.dump(stats, f, indent=1)

    atexit.register(dump)
