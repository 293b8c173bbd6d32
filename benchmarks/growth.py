"""Scenario 5: cost as the tables grow.

The durable tables are pre-filled with N finished runs of 3 steps each,
cloned from a real run (bulk inserts through the ``Table`` objects of
``flask_durable.store.schema``; the clones keep the app's ``app_id``), then
the 3-step durable request is measured against the plain view at each N. The
ratio durable/plain at N over the same ratio at the smallest N shows whether
a checkpoint gets slower as history accumulates (target: within 20%).
"""

from __future__ import annotations

import os
import sqlite3
import time
from typing import Any

import sqlalchemy as sa
from apps import close, make_app, requester
from common import (
    Mode,
    Report,
    interleaved,
    log,
    recreate_pg_database,
    retrying,
    temp_dir,
)

from flask_durable.store import schema

BATCH = 5_000
TOLERANCE = 0.20


def _templates(app: Any) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """A real finished run and its steps, to clone."""
    response = app.test_client().get("/durable/3")
    run_id = response.headers["Durable-Run-Id"]
    store = app.extensions["durable"].store
    runs, steps = schema.runs, schema.steps
    with store.engine.connect() as conn:
        run = dict(
            conn.execute(sa.select(runs).where(runs.c.id == run_id)).one()._mapping
        )
        step_rows = [
            dict(r._mapping)
            for r in conn.execute(sa.select(steps).where(steps.c.run_id == run_id))
        ]
    return run, step_rows


def prefill(
    app: Any,
    start: int,
    stop: int,
    run: dict[str, Any],
    step_rows: list[dict[str, Any]],
) -> float:
    """Insert finished runs number ``start`` to ``stop`` (exclusive);
    returns the seconds taken."""
    store = app.extensions["durable"].store
    runs, steps = schema.runs, schema.steps
    # Older than any live run: ids sort by creation time.
    base_ms = int((time.time() - 400 * 86400) * 1000)
    t0 = time.perf_counter()
    for lo in range(start, stop, BATCH):
        hi = min(stop, lo + BATCH)
        run_rows = []
        all_steps = []
        for i in range(lo, hi):
            rid = f"{base_ms + i // 50:012x}{i:020x}"
            created = (base_ms + i // 50) / 1000.0
            run_rows.append(
                dict(
                    run,
                    id=rid,
                    created_at=created,
                    updated_at=created + 0.002,
                    finished_at=created + 0.002,
                )
            )
            for s in step_rows:
                all_steps.append(
                    dict(
                        s,
                        run_id=rid,
                        started_at=created + 0.001,
                        finished_at=created + 0.001,
                    )
                )
        with store.begin() as conn:
            conn.execute(runs.insert(), run_rows)
            conn.execute(steps.insert(), all_steps)
    took = time.perf_counter() - t0
    if store.engine.dialect.name == "sqlite":
        # Fold the WAL back into the database, as a quiet server would.
        with sqlite3.connect(store.engine.url.database) as raw:
            raw.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    else:
        # What autovacuum would have done by the time a real table got
        # this big.
        auto = store.engine.execution_options(isolation_level="AUTOCOMMIT")
        with auto.connect() as conn:
            conn.execute(sa.text("ANALYZE durable_runs"))
            conn.execute(sa.text("ANALYZE durable_steps"))
    return took


def _measure(
    mode: Mode, sizes: list[int], db: str, uri: str, ref_uri: str
) -> list[dict[str, Any]]:
    rows = []
    app = make_app(uri)
    ref = make_app(ref_uri)
    try:
        run_row, step_rows = _templates(app)
        ref.test_client().get("/durable/3")  # creates its tables
        prefill(ref, 0, sizes[0], run_row, step_rows)
        filled = 0
        for n in sizes:
            took = prefill(app, filled, n, run_row, step_rows)
            log(f"growth {db}: {n:,} runs (+{n - filled:,} in {took:.1f} s)")
            filled = n
            s = interleaved(
                {
                    "plain": requester(app, "/plain/3"),
                    "reference": requester(ref, "/durable/3"),
                    "durable": requester(app, "/durable/3"),
                },
                mode,
            )
            rel = s.ratio("durable", "reference")
            rows.append(
                dict(
                    db=db,
                    runs=f"{n:,}",
                    steps=f"{3 * n:,}",
                    durable_rps=s.rate("durable"),
                    durable_us=s.us("durable"),
                    reference_us=s.us("reference"),
                    added_us=s.us("durable") - s.us("plain"),
                    vs_smallest=rel,
                    ok="yes" if abs(rel - 1) <= TOLERANCE else "NO",
                )
            )
    finally:
        close(app)
        close(ref)
    return rows


def run(mode: Mode, pg: bool) -> list[Report]:
    report = Report("growth", "5. Cost as the runs table grows (3-step request)")
    sizes = {
        "sqlite": [1_000, 10_000]
        if mode.quick
        else [1_000, 10_000, 100_000, 1_000_000],
        "postgresql": [1_000, 10_000] if mode.quick else [1_000, 10_000, 100_000],
    }
    dbs = ["sqlite"] + (["postgresql"] if pg else [])
    with temp_dir("growth") as workdir:
        for db in dbs:

            def measure(db: str = db) -> list[dict[str, Any]]:
                tag = time.monotonic_ns()
                if db == "sqlite":
                    uri = f"sqlite:///{os.path.join(workdir, f'growth-{tag}.db')}"
                    ref_uri = f"sqlite:///{os.path.join(workdir, f'ref-{tag}.db')}"
                else:
                    uri = recreate_pg_database("durable_bench")
                    ref_uri = recreate_pg_database("durable_bench_ref")
                return _measure(mode, sizes[db], db, uri, ref_uri)

            for row in retrying(f"growth {db}", measure):
                report.row(**row)
    report.note(
        "vs_smallest = durable req/s on the table of N runs / durable req/s on a"
        " reference table of the smallest size, measured side by side in the"
        " same rounds (1.00 = no slowdown; target within 20%). added_us ="
        " durable minus plain request time. Runs are pre-filled as finished runs"
        " of 3 steps each (bulk inserts through flask_durable.store.schema's"
        " tables);"
        " PostgreSQL tables are ANALYZEd after each fill, as autovacuum would."
    )
    return [report]
