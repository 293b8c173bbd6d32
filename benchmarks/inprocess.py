"""Scenarios 1 and 2: requests through Flask's test client, in process.

1. Throughput: ``/plain/3`` vs ``/durable/3`` (3 ``step.run`` calls) on
   SQLite (default settings: WAL, ``synchronous=NORMAL``) and PostgreSQL, in
   ``sync`` and ``async`` checkpoint modes.
2. Per-step overhead: ``/durable/k`` minus ``/plain/k`` divided by ``k``,
   for ``k`` = 1, 10, 100.
"""

from __future__ import annotations

import os
import sqlite3
import statistics
import time
from typing import Any

from apps import bare_app, close, make_app, requester, work
from common import (
    Mode,
    Report,
    Series,
    interleaved,
    recreate_pg_database,
    retrying,
    temp_dir,
)
from flask import jsonify

from flask_durable import Durable, current_run, step

TARGET_SYNC = 0.6
TARGET_ASYNC = 0.85


def probe_async(uri: str) -> str:
    """Whether ``DURABLE_CHECKPOINT="async"`` is accepted, and whether a
    step's row is already committed when ``step.run`` returns (then async
    behaves as sync)."""
    try:
        app = make_app(uri, checkpoint="async", scheduler=False)
    except ValueError as e:
        return f"rejected ({e})"
    path = uri.split("sqlite:///", 1)[1]

    # Durable() without an app is only a handle: endpoint() finds the
    # lifecycle of the current app (app.extensions["durable"]).
    @app.get("/probe")
    @Durable().endpoint
    def probe() -> Any:
        step.run("a", work, 0)
        with sqlite3.connect(path) as conn:
            seen = conn.execute(
                "SELECT count(*) FROM durable_steps WHERE run_id = ?",
                (current_run.id,),
            ).fetchone()[0]
        return jsonify(seen=seen)

    try:
        client = app.test_client()
        seen = [client.get("/probe").get_json()["seen"] for _ in range(5)]
    finally:
        close(app)
    if all(seen):
        return "accepted, behaves as sync (step committed before step.run returns)"
    return "implemented (step not yet committed when step.run returns)"


def throughput(mode: Mode, workdir: str, pg: bool) -> Report:
    report = Report("inprocess", "1. In process (Flask test client), 3 steps")
    async_status = probe_async(f"sqlite:///{os.path.join(workdir, 'probe.sqlite3')}")
    report.data["async_status"] = async_status
    report.note(f'DURABLE_CHECKPOINT="async": {async_status}')
    bare = requester(bare_app(), "/plain/3")
    targets: list[tuple[str, str]] = [("sqlite", "sync"), ("sqlite", "async")]
    if pg:
        targets += [("postgresql", "sync"), ("postgresql", "async")]
    for db, checkpoint in targets:
        settings = (
            "WAL, synchronous=NORMAL" if db == "sqlite" else "synchronous_commit=on"
        )

        def measure(db: str = db, checkpoint: str = checkpoint) -> Series:
            if db == "sqlite":
                name = f"inproc-{checkpoint}-{time.monotonic_ns()}.sqlite3"
                uri = f"sqlite:///{os.path.join(workdir, name)}"
            else:
                uri = recreate_pg_database("durable_bench")
            app = make_app(uri, checkpoint=checkpoint)
            try:
                return interleaved(
                    {
                        "bare": bare,
                        "plain": requester(app, "/plain/3"),
                        "durable": requester(app, "/durable/3"),
                    },
                    mode,
                )
            finally:
                close(app)

        s = retrying(f"inprocess {db} {checkpoint}", measure)
        ratio = s.ratio("durable", "plain")
        label = checkpoint
        if checkpoint == "async" and "behaves as sync" in async_status:
            label = "async (=sync)"
        target = TARGET_SYNC if checkpoint == "sync" else TARGET_ASYNC
        report.row(
            db=db,
            checkpoint=label,
            settings=settings,
            bare_rps=s.rate("bare"),
            plain_rps=s.rate("plain"),
            durable_rps=s.rate("durable"),
            plain_us=s.us("plain"),
            durable_us=s.us("durable"),
            added_us=s.us("durable") - s.us("plain"),
            ratio=ratio,
            target=f">={target}",
            ok="yes" if ratio >= target else "NO",
        )
    report.note(
        "bare = the plain view in an app without flask-durable (same SECRET_KEY);"
        " plain = the same view in the app that has flask-durable (which costs"
        " other views one WSGI middleware call; it registers no before_request"
        " hook); ratio = durable/plain req/s, median of per-round ratios."
    )
    return report


def step_overhead(mode: Mode, workdir: str, pg: bool) -> Report:
    report = Report("step_overhead", "2. Per-step overhead (sync checkpoints)")
    dbs = ["sqlite"] + (["postgresql"] if pg else [])
    for db in dbs:
        for k in (1, 10, 100):

            def measure(db: str = db, k: int = k) -> Series:
                if db == "sqlite":
                    name = f"steps-{k}-{time.monotonic_ns()}.sqlite3"
                    uri = f"sqlite:///{os.path.join(workdir, name)}"
                else:
                    uri = recreate_pg_database("durable_bench")
                app = make_app(uri)
                try:
                    return interleaved(
                        {
                            "plain": requester(app, f"/plain/{k}"),
                            "durable": requester(app, f"/durable/{k}"),
                        },
                        mode,
                    )
                finally:
                    close(app)

            s = retrying(f"step overhead {db} k={k}", measure)
            per_step = statistics.median(
                (d - p) / k * 1e6
                for d, p in zip(s.per_op["durable"], s.per_op["plain"], strict=True)
            )
            report.row(
                db=db,
                steps=k,
                plain_us=s.us("plain"),
                durable_us=s.us("durable"),
                per_step_us=per_step,
            )
    report.note(
        "per_step_us = (durable - plain request time) / steps, median of rounds;"
        " for 1 step it includes the whole per-run cost (insert of the run,"
        " final response), which 100 steps amortize."
    )
    return report


def run(mode: Mode, pg: bool) -> list[Report]:
    with temp_dir("inprocess") as workdir:
        return [throughput(mode, workdir, pg), step_overhead(mode, workdir, pg)]
