"""Server time of the runs list and the run page with 1,000,000 runs.

Scenario (issue: "Seed 1,000,000 finished runs (SQLite and PostgreSQL): the
runs list (first page, a filtered page, the 1,000th page by cursor) and a
run page render in under 100 ms of server time each"):

1. One app, one durable endpoint of 3 steps; a real run of it is cloned
   into N finished runs by bulk inserts (``growth.prefill``), one in every
   100 marked ``failed`` and given an idempotency key, so that the filtered
   page and the search have something to find.
2. Each request goes through Flask's test client (the whole app: routing,
   access rule, query, rendering); its server time is the median and the
   worst of ``--repeat`` calls, after one warm-up call:

   - ``GET /durable/api/runs`` and ``GET /durable/`` (the first page, 50),
   - the same filtered by ``status=failed``,
   - the 1,000th page: the cursor that page 999 hands back,
   - ``q=<idempotency key>`` and ``q=<run id>`` (search),
   - ``GET /durable/api/runs/<id>`` and ``GET /durable/runs/<id>``.

Writes ``benchmarks/results/runs_list.json``. Usage::

    python benchmarks/runs_list.py [--runs 1000000] [--backend sqlite|postgres]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from typing import Any

import sqlalchemy as sa
from flask import Flask, jsonify

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from growth import prefill  # noqa: E402

from flask_durable import Durable, step  # noqa: E402
from flask_durable.store import schema  # noqa: E402

PAGE = 50


def make_app(url: str) -> Flask:
    app = Flask(__name__)
    app.config.update(
        SECRET_KEY="bench", DURABLE_DATABASE_URI=url, DURABLE_RETENTION=None
    )
    durable = Durable(app)
    durable.dashboard_auth(lambda: True)

    @app.get("/durable/3")
    @durable.endpoint
    def three() -> Any:
        a = step.run("a", lambda: {"n": 1})
        b = step.run("b", lambda: {"n": 2})
        c = step.run("c", lambda: {"n": 3})
        return jsonify(a=a, b=b, c=c)

    return app


def seed(app: Flask, n: int) -> tuple[str, str, str]:
    """N finished runs; returns a failed run's id, its idempotency key and
    the id of the newest run."""
    response = app.test_client().get("/durable/3")
    run_id = response.headers["Durable-Run-Id"]
    store = app.extensions["durable"].store
    with store.engine.connect() as conn:
        run = dict(
            conn.execute(sa.select(schema.runs).where(schema.runs.c.id == run_id))
            .one()
            ._mapping
        )
        steps = [
            dict(r._mapping)
            for r in conn.execute(
                sa.select(schema.steps).where(schema.steps.c.run_id == run_id)
            )
        ]
    took = prefill(app, 0, n, run, steps)
    print(f"seeded {n:,} runs in {took:.1f} s", flush=True)
    # Mark one run in 100 failed, with an idempotency key.
    runs = schema.runs
    with store.begin() as conn:
        ids = [
            r.id for r in conn.execute(sa.select(runs.c.id).where(runs.c.id != run_id))
        ]
        failed = ids[::100]
        for lo in range(0, len(failed), 5000):
            conn.execute(
                runs.update()
                .where(runs.c.id == sa.bindparam("rid"))
                .values(
                    status="failed",
                    error="RuntimeError: seeded",
                    idempotency_key=sa.bindparam("key"),
                ),
                [{"rid": rid, "key": f"key-{rid}"} for rid in failed[lo : lo + 5000]],
            )
    if store.engine.dialect.name == "postgresql":
        auto = store.engine.execution_options(isolation_level="AUTOCOMMIT")
        with auto.connect() as conn:
            conn.execute(sa.text("ANALYZE durable_runs"))
    some = failed[len(failed) // 2]
    return some, f"key-{some}", max(ids)


def timed(client: Any, path: str, repeat: int) -> dict[str, float]:
    response = client.get(path)
    assert response.status_code == 200, (path, response.status_code)
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        response = client.get(path)
        times.append((time.perf_counter() - t0) * 1000)
        assert response.status_code == 200, (path, response.status_code)
    return {"median_ms": statistics.median(times), "max_ms": max(times)}


def cursor_of_page(client: Any, page: int) -> str:
    """The cursor that page ``page - 1`` hands back (walking every page,
    as a user clicking "older" would)."""
    cursor = None
    for _ in range(page - 1):
        url = f"/durable/api/runs?limit={PAGE}"
        if cursor:
            url += f"&cursor={cursor}"
        cursor = client.get(url).get_json()["next_cursor"]
    assert cursor
    return cursor


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=1_000_000)
    parser.add_argument("--backend", choices=("sqlite", "postgres"), default="sqlite")
    parser.add_argument("--repeat", type=int, default=20)
    args = parser.parse_args()
    tmp = tempfile.mkdtemp(prefix="durable-list-")
    if args.backend == "sqlite":
        url = f"sqlite:///{tmp}/runs.sqlite3"
        drop = None
    else:
        sys.path.insert(0, os.path.join(HERE, "..", "tests"))
        from procs import create_database, drop_database

        base = os.environ.get(
            "DURABLE_TEST_POSTGRES_URL",
            "postgresql+psycopg://postgres@127.0.0.1:5432/postgres",
        )
        url = create_database(base)
        drop = drop_database
    app = make_app(url)
    try:
        failed_id, key, newest = seed(app, args.runs)
        client = app.test_client()
        page_1000 = cursor_of_page(client, 1000)
        cases = {
            "first page (API)": f"/durable/api/runs?limit={PAGE}",
            "first page (HTML)": "/durable/",
            "status=failed (API)": f"/durable/api/runs?status=failed&limit={PAGE}",
            "status=failed (HTML)": "/durable/?status=failed",
            "1,000th page (API)": f"/durable/api/runs?limit={PAGE}&cursor={page_1000}",
            "1,000th page (HTML)": f"/durable/?cursor={page_1000}",
            "search by key (API)": f"/durable/api/runs?q={key}",
            "search by run id (API)": f"/durable/api/runs?q={newest}",
            "run page (API)": f"/durable/api/runs/{failed_id}",
            "run page (HTML)": f"/durable/runs/{failed_id}",
        }
        results = {}
        only = os.environ.get("RUNS_LIST_ONLY")
        for name, path in cases.items():
            if only and only not in name:
                continue
            results[name] = timed(client, path, args.repeat)
            r = results[name]
            print(
                f"{name:26} median {r['median_ms']:7.1f} ms  max {r['max_ms']:7.1f} ms",
                flush=True,
            )
        out = os.path.join(HERE, "results", "runs_list.json")
        try:
            with open(out) as f:
                saved = json.load(f)
        except (OSError, ValueError):
            saved = {}
        saved[args.backend] = {"runs": args.runs, "results": results}
        with open(out, "w") as f:
            json.dump(saved, f, indent=2)
    finally:
        app.extensions["durable"].close()
        if drop is not None:
            drop(url)


if __name__ == "__main__":
    main()
