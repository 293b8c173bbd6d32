"""Flow control (issue 18): what a limit costs an endpoint's happy path, and
how fast a queue of 10,000 runs under a concurrency limit drains.

**1. Happy path** (in process, Flask test client, SQLite and PostgreSQL).
The app of :func:`flow_app.endpoint_app` has the same 3-step durable
endpoint four times: ``/base/3`` without limits, and under limits that one
request at a time never reaches: ``/concurrency/3``
(``concurrency={"limit": 1000, "key": lambda r: "k"}``), ``/rate/3``
(``rate_limit``, 10^6 per second) and ``/throttle/3`` (``throttle``, 10^6
per second, burst 1000). Batches of the four alternate (rounds, the order
rotating each round, one uncounted warm-up batch each, batch sizes
calibrated to ``--batch-seconds``); per batch: wall time, this process's
CPU time (``time.process_time``: the request thread, and the scheduler's
threads, which run the admission that the end of a limited run triggers)
and, on PostgreSQL, the CPU of the database's backends (``/proc``).
Reported per limited endpoint: microseconds per request of both,
``added_us`` = the median of the per-round differences (limited - base),
the same for CPU. Each database is measured twice, in a fresh file or
database each time: with the scheduler on (flask-durable's default) and
off (``DURABLE_SCHEDULER=False``: web processes behind ``flask durable
worker``; no admission runs in the web process). SQLite: a file on the
project's disk, flask-durable's defaults (WAL, ``synchronous=NORMAL``);
PostgreSQL: ``synchronous_commit`` as the server has it (read back).
``DURABLE_CHECKPOINT="sync"``.

**2. Queue drain** (PostgreSQL, worker processes). This process builds
:func:`flow_app.create_app` with ``DURABLE_SCHEDULER=False`` and stores N
runs of the function ``flow-drain`` (``concurrency={"limit": 20}``; one
trivial ``step.run``) with ``send_events`` in batches of 1,000 events (one
transaction each) into a template database: every run is ``queued``. For
each K (1, then 2), a fresh copy of it (``CREATE DATABASE ... TEMPLATE``)
is drained by K ``flask --app flow_app:create_app durable worker``
processes (``--threads`` = ``DURABLE_WORKERS`` each, 16 by default: one
worker stays under the limit, two exceed it), started at once, and the
count of ``completed`` runs is polled (every 0.2 s, a separate connection)
until it is N. Reported: runs/s between the first and the last
``finished_at`` and in the steady part (10% to 90% of the completions), the
time from starting the workers to the last completion, CPU per run of the
workers and of PostgreSQL (all its processes), the cores other processes
used meanwhile, ``pg_stat_activity`` waits of the database sampled every
100 ms, and the workers' calls of the store's admission methods (counts,
wall and thread-CPU time, through wrappers set on the store instance by
``BENCH_STATS_OUT``; the library is not modified). The **yardstick** is the
same drain without a limit (``BENCH_LIMIT=0``: plain ``scheduled`` runs
claimed by the ordinary sweep/drain path), same N, K and threads.
Correctness: the function appends ``S <event id> <pid> <t>`` before its
step and ``E ...`` after it to one ``O_APPEND`` ledger; every event id must
have exactly one ``S`` (no run started twice, none forgotten), and the most
runs between ``S`` and ``E`` at once must not exceed the limit.

Usage::

    .venv/bin/python benchmarks/flow_bench.py             # full, ~6-7 minutes
    .venv/bin/python benchmarks/flow_bench.py --quick     # smoke run, 1,000 runs
    .venv/bin/python benchmarks/flow_bench.py --only drain --workers 1 --runs 4000

``--only history`` (never part of the default run) measures the admission
pass that follows every end of a limited run against the number of finished
runs under a limit (100, 1,000, 5,000; ``--history-max``).

Writes ``benchmarks/results/flow.json`` (``--quick`` and ``--only`` write
nothing unless ``--output`` is given). PostgreSQL at ``127.0.0.1:5432`` (databases
``durable_bench_flow``, ``durable_bench_flow_queue`` and
``durable_bench_flow_drain``, dropped and recreated, dropped at the end;
``BENCH_PG_ADMIN_DSN`` overrides the server); without it only the SQLite
rows are measured. A measurement that fails (the shared server restarting)
is retried once. Every child process is killed at exit.
"""

from __future__ import annotations

import argparse
import bisect
import collections
import gc
import json
import os
import platform
import statistics
import sys
import threading
import time
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if HERE not in sys.path:
    sys.path.insert(0, HERE)

from common import calibrate, temp_dir  # noqa: E402
from scaleout import Children, CpuMeter, proc_cpu, tail  # noqa: E402

RESULTS = os.path.join(HERE, "results")
PG_ADMIN = os.environ.get("BENCH_PG_ADMIN_DSN", "postgresql://postgres@127.0.0.1:5432")
ENDPOINT_DB = "durable_bench_flow"
DRAIN_DB = "durable_bench_flow_drain"
TEMPLATE_DB = "durable_bench_flow_queue"
VARIANTS = {
    "base": "/base/3",
    "concurrency": "/concurrency/3",
    "rate_limit": "/rate/3",
    "throttle": "/throttle/3",
}
SEND_BATCH = 1000


def log(message: str) -> None:
    print(f"[flow {time.strftime('%H:%M:%S')}] {message}", flush=True)


def app_url(database: str) -> str:
    return "postgresql+psycopg://" + f"{PG_ADMIN}/{database}".split("://", 1)[1]


def pg_connect(database: str = "postgres") -> Any:
    import psycopg

    return psycopg.connect(f"{PG_ADMIN}/{database}", autocommit=True)


def reset_db(database: str, create: bool = True) -> None:
    with pg_connect() as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {database} WITH (FORCE)")
        if create:
            conn.execute(f"CREATE DATABASE {database}")


def postgres_ok() -> str | None:
    try:
        with pg_connect() as conn:
            conn.execute("SELECT 1")
    except Exception as e:  # pragma: no cover - depends on the machine
        return f"{type(e).__name__}: {e}".splitlines()[0]
    return None


def pg_setting(name: str) -> str:
    with pg_connect() as conn:
        return str(conn.execute(f"SHOW {name}").fetchone()[0])


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


# -- 1. happy path -----------------------------------------------------------


class BackendCpu:
    """CPU seconds of the PostgreSQL backends connected to one database
    (pids from ``pg_stat_activity``, read before and after a batch; a
    backend that appears during the batch counts from 0)."""

    def __init__(self, database: str) -> None:
        self.database = database
        self.conn = pg_connect()

    def snap(self) -> dict[int, float]:
        rows = self.conn.execute(
            "SELECT pid FROM pg_stat_activity WHERE datname = %s", (self.database,)
        ).fetchall()
        out = {}
        for (pid,) in rows:
            cpu = proc_cpu(pid)
            if cpu is not None:
                out[pid] = cpu
        return out

    @staticmethod
    def delta(a: dict[int, float], b: dict[int, float]) -> float:
        return sum(v - a.get(pid, 0.0) for pid, v in b.items())

    def close(self) -> None:
        self.conn.close()


def requester(app: Any, path: str) -> Any:
    client = app.test_client()

    def fn(n: int) -> None:
        get = client.get
        for _ in range(n):
            response = get(path)
            if response.status_code != 200:
                raise RuntimeError(
                    f"{path}: {response.status_code} {response.get_data()[:200]!r}"
                )
            response.close()

    return fn


def endpoint_rounds(
    uri: str, scheduler: bool, args: argparse.Namespace, backends: BackendCpu | None
) -> dict[str, Any]:
    import flow_app

    app = flow_app.endpoint_app(uri, DURABLE_SCHEDULER=scheduler)
    lifecycle = app.extensions["durable"]
    try:
        fns = {name: requester(app, path) for name, path in VARIANTS.items()}
        for fn in fns.values():  # tables, pools, the flow rows, caches
            fn(20)
        sizes = {
            name: calibrate(fn, args.batch_seconds, cap=20_000)
            for name, fn in fns.items()
        }
        names = list(fns)
        wall: dict[str, list[float]] = {n: [] for n in names}
        cpu: dict[str, list[float]] = {n: [] for n in names}
        pg: dict[str, list[float]] = {n: [] for n in names}
        for r in range(args.rounds):
            order = names[r % len(names) :] + names[: r % len(names)]
            for name in order:
                n = sizes[name]
                gc.collect()
                b0 = backends.snap() if backends else {}
                c0 = time.process_time()
                t0 = time.perf_counter()
                fns[name](n)
                t1 = time.perf_counter()
                c1 = time.process_time()
                b1 = backends.snap() if backends else {}
                wall[name].append((t1 - t0) / n)
                cpu[name].append((c1 - c0) / n)
                if backends:
                    pg[name].append(BackendCpu.delta(b0, b1) / n)
        keyed, admit_us = admit_probe(lifecycle)
        return {
            "sizes": sizes,
            "wall": wall,
            "cpu": cpu,
            "pg": pg,
            "keyed_runs_at_end": keyed,
            "admit_cpu_us": admit_us,
            "breakdown": breakdown(lifecycle, fns),
        }
    finally:
        lifecycle.close()


#: The store methods of a request whose CPU :func:`breakdown` reports.
BREAKDOWN = ("enter", "rate_limit", "_lock_key", "_running", "_gcra", "write", "admit")


def breakdown(lifecycle: Any, fns: dict[str, Any], n: int = 100) -> dict[str, Any]:
    """After the timed rounds: ``n`` more requests of each endpoint with
    wrappers on the store instance's methods :data:`BREAKDOWN`: per request,
    how often each is called and its thread CPU time per call (us; the
    scheduler's admission passes run in its pool threads). Not part of the
    timed figures (the wrappers cost a few microseconds a call)."""
    import flow_app

    out: dict[str, Any] = {}
    store = lifecycle.store
    for name, fn in fns.items():
        stats = flow_app.instrument(store, BREAKDOWN)
        try:
            fn(n)
            time.sleep(0.05)  # the last admission pass, if any
        finally:
            flow_app.uninstrument(store, BREAKDOWN)
        out[name] = {
            method: {
                "per_request": round(s["calls"] / n, 2),
                "cpu_us_per_call": round(s["cpu_s"] / s["calls"] * 1e6, 1),
                "wall_us_per_call": round(s["wall_s"] / s["calls"] * 1e6, 1),
            }
            for method, s in sorted(stats.items())
        }
    return out


def admit_probe(lifecycle: Any, calls: int = 10) -> tuple[int, float]:
    """The runs with a flow key in the table, and the thread CPU time of
    one admission pass with nothing queued (``Store.admit``, as the
    scheduler calls it after every end of a limited run): median of 5
    series of ``calls`` calls, in microseconds."""
    store = lifecycle.store
    limits = lifecycle.flow_limits()
    with store.engine.connect() as conn:
        keyed = conn.exec_driver_sql(
            "SELECT count(*) FROM durable_runs WHERE flow_key IS NOT NULL"
        ).scalar()
    series = []
    for _ in range(5):
        c0 = time.thread_time()
        for _ in range(calls):
            store.admit("bench-probe", limits, 8)
        series.append((time.thread_time() - c0) / calls * 1e6)
    return int(keyed), statistics.median(series)


def history_scenario(args: argparse.Namespace, pg_ok: bool) -> list[dict[str, Any]]:
    """``--only history``: the admission pass of :func:`admit_probe` after
    100, 1,000 and 5,000 (``--history-max``) finished runs of
    ``/concurrency/3``, scheduler off, SQLite and PostgreSQL."""
    import flow_app

    rows = []
    sizes = [n for n in (100, 1000, 5000, 20_000) if n <= args.history_max]
    with temp_dir("flow-history") as workdir:
        for db in ["sqlite"] + (["postgresql"] if pg_ok else []):
            if db == "sqlite":
                uri = f"sqlite:///{os.path.join(workdir, 'history.sqlite3')}"
            else:
                reset_db(ENDPOINT_DB)
                uri = app_url(ENDPOINT_DB)
            app = flow_app.endpoint_app(uri, DURABLE_SCHEDULER=False)
            lifecycle = app.extensions["durable"]
            fill = requester(app, "/concurrency/3")
            done = 0
            try:
                for n in sizes:
                    t0 = time.perf_counter()
                    fill(n - done)
                    request_us = (time.perf_counter() - t0) / (n - done) * 1e6
                    done = n
                    keyed, admit_us = admit_probe(lifecycle)
                    rows.append(
                        {
                            "db": db,
                            "keyed_runs": keyed,
                            "admit_cpu_us": admit_us,
                            "fill_request_us": request_us,
                        }
                    )
                    log(f"history {db}: {keyed} runs, admit {admit_us:.0f} us CPU")
            finally:
                lifecycle.close()
                if db == "postgresql":
                    reset_db(ENDPOINT_DB, create=False)
    return rows


def retrying(label: str, fn: Any, attempts: int = 2) -> Any:
    """``fn()``, once more if it raises (the shared database server may
    restart under a benchmark)."""
    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except Exception as e:
            if attempt == attempts:
                raise
            log(f"{label}: {type(e).__name__}: {str(e)[:200]}; retrying")
            time.sleep(5)


def endpoint_scenario(args: argparse.Namespace, pg_ok: bool) -> dict[str, Any]:
    rows: list[dict[str, Any]] = []
    raw: dict[str, Any] = {}
    settings: dict[str, str] = {"sqlite": "WAL, synchronous=NORMAL"}
    with temp_dir("flow") as workdir:
        targets = [
            (db, scheduler)
            for db in ["sqlite"] + (["postgresql"] if pg_ok else [])
            for scheduler in (True, False)
        ]
        for db, scheduler in targets:
            label = f"{db}, scheduler {'on' if scheduler else 'off'}"

            def measure(db: str = db, scheduler: bool = scheduler) -> Any:
                backends = None
                if db == "sqlite":
                    name = f"flow-{time.monotonic_ns()}.sqlite3"
                    uri = f"sqlite:///{os.path.join(workdir, name)}"
                else:
                    reset_db(ENDPOINT_DB)
                    uri = app_url(ENDPOINT_DB)
                    backends = BackendCpu(ENDPOINT_DB)
                    settings["postgresql"] = (
                        f"synchronous_commit={pg_setting('synchronous_commit')}"
                    )
                try:
                    return endpoint_rounds(uri, scheduler, args, backends)
                finally:
                    if backends:
                        backends.close()
                    if db == "postgresql":
                        reset_db(ENDPOINT_DB, create=False)

            log(f"happy path, {label}: {args.rounds} rounds")
            t0 = time.time()
            data = retrying(f"happy path, {label}", measure)
            raw[label] = data
            wall, cpu, pg = data["wall"], data["cpu"], data["pg"]
            for name in VARIANTS:
                if name == "base":
                    continue

                def diff(series: dict[str, list[float]], name: str = name) -> float:
                    return median(
                        [
                            (a - b) * 1e6
                            for a, b in zip(series[name], series["base"], strict=True)
                        ]
                    )

                rows.append(
                    {
                        "db": db,
                        "scheduler": "on" if scheduler else "off",
                        "limit": name,
                        "base_us": median(wall["base"]) * 1e6,
                        "limited_us": median(wall[name]) * 1e6,
                        "added_us": diff(wall),
                        "added_pct": 100
                        * median(
                            [
                                a / b - 1
                                for a, b in zip(wall[name], wall["base"], strict=True)
                            ]
                        ),
                        "base_cpu_us": median(cpu["base"]) * 1e6,
                        "limited_cpu_us": median(cpu[name]) * 1e6,
                        "added_cpu_us": diff(cpu),
                        "added_pg_us": diff(pg) if pg["base"] else float("nan"),
                        "keyed_runs": data["keyed_runs_at_end"],
                        "admit_cpu_us": data["admit_cpu_us"],
                    }
                )
            log(f"happy path, {label}: {time.time() - t0:.0f} s")
    return {
        "rows": rows,
        "breakdown": {label: raw[label]["breakdown"] for label in raw},
        "settings": settings,
        "rounds": args.rounds,
        "batch_seconds": args.batch_seconds,
        "batches": {label: raw[label]["sizes"] for label in raw},
        "per_round_s": {
            label: {k: raw[label][k] for k in ("wall", "cpu", "pg")} for label in raw
        },
    }


# -- 2. queue drain ----------------------------------------------------------


def drain_env(
    limit: int, ledger: str, database: str = DRAIN_DB, **extra: Any
) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([HERE, ROOT, env.get("PYTHONPATH", "")])
    env.pop("FLASK_APP", None)
    env.update(
        BENCH_DB_URL=app_url(database),
        BENCH_LIMIT=str(limit),
        BENCH_LEDGER=ledger,
    )
    env.update({k: str(v) for k, v in extra.items()})
    return env


def store_runs(n: int, limit: int) -> tuple[float, dict[str, int]]:
    """Store ``n`` runs of ``flow-drain`` in a fresh template database, from
    this process (scheduler off); returns the seconds it took and the runs
    by status. Each drain then starts from a copy (``CREATE DATABASE ...
    TEMPLATE``), so that 1 and 2 workers drain the same queue."""
    import flow_app

    reset_db(TEMPLATE_DB)
    saved = dict(os.environ)
    os.environ.update(drain_env(limit, "", TEMPLATE_DB, BENCH_SCHEDULER=0))
    try:
        app = flow_app.create_app()
    finally:
        os.environ.clear()
        os.environ.update(saved)
    lifecycle = app.extensions["durable"]
    t0 = time.perf_counter()
    try:
        with app.app_context():
            for start in range(0, n, SEND_BATCH):
                lifecycle.send_events(
                    [
                        lifecycle.events.check(flow_app.EVENT_NAME, {"n": i}, f"e{i}")
                        for i in range(start, min(n, start + SEND_BATCH))
                    ]
                )
    finally:
        lifecycle.close()
    took = time.perf_counter() - t0
    with pg_connect(TEMPLATE_DB) as conn:
        statuses = dict(
            conn.execute(
                "SELECT status, count(*) FROM durable_runs GROUP BY status"
            ).fetchall()
        )
    return took, statuses


def copy_queue() -> None:
    """The drain database, a copy of the template (retried: the template
    must have no session, and the sender's may take a moment to end)."""
    for attempt in range(20):
        try:
            with pg_connect() as conn:
                conn.execute(f"DROP DATABASE IF EXISTS {DRAIN_DB} WITH (FORCE)")
                conn.execute(f"CREATE DATABASE {DRAIN_DB} TEMPLATE {TEMPLATE_DB}")
            return
        except Exception:
            if attempt == 19:
                raise
            time.sleep(0.25)


class WaitSampler(threading.Thread):
    """``pg_stat_activity`` of one database every 100 ms: the mean number
    of its backends in each (state, wait event), and the pids of its
    backends, whose CPU :meth:`backend_cpu` sums (the machine's other
    PostgreSQL sessions are not counted)."""

    def __init__(self, database: str) -> None:
        super().__init__(daemon=True)
        self.database = database
        self.counts: collections.Counter[str] = collections.Counter()
        self.samples = 0
        self.halt = threading.Event()
        self.conn = pg_connect()
        self.baseline = {pid: proc_cpu(pid) or 0.0 for pid in self._pids()}
        self.cpu: dict[int, float] = dict(self.baseline)

    def _pids(self) -> list[int]:
        return [
            pid
            for (pid,) in self.conn.execute(
                "SELECT pid FROM pg_stat_activity WHERE datname = %s",
                (self.database,),
            ).fetchall()
        ]

    def run(self) -> None:
        try:
            while not self.halt.is_set():
                rows = self.conn.execute(
                    "SELECT pid, state, wait_event_type, wait_event"
                    " FROM pg_stat_activity WHERE datname = %s",
                    (self.database,),
                ).fetchall()
                for pid, state, kind, event in rows:
                    wait = f"{kind}/{event}" if kind else "cpu"
                    self.counts[f"{state or '-'}: {wait}"] += 1
                    used = proc_cpu(pid)
                    if used is not None:
                        self.cpu[pid] = used
                self.samples += 1
                self.halt.wait(0.1)
        finally:
            self.conn.close()

    def backend_cpu(self) -> float:
        """CPU seconds the database's backends used since the sampler was
        created (up to their last sample; a backend that ended in between
        samples loses at most 100 ms of its CPU)."""
        return sum(v - self.baseline.get(pid, 0.0) for pid, v in self.cpu.items())

    def report(self) -> dict[str, float]:
        if not self.samples:
            return {}
        return {
            k: round(v / self.samples, 2)
            for k, v in self.counts.most_common()
            if v / self.samples >= 0.01
        }


def read_ledger(path: str, n: int, limit: int) -> dict[str, Any]:
    starts: collections.Counter[str] = collections.Counter()
    ends: collections.Counter[str] = collections.Counter()
    pids: collections.Counter[str] = collections.Counter()
    events: list[tuple[float, int]] = []
    with open(path) as f:
        for line in f:
            kind, event_id, pid, t = line.split()
            if kind == "S":
                starts[event_id] += 1
                pids[pid] += 1
                events.append((float(t), 1))
            else:
                ends[event_id] += 1
                events.append((float(t), -1))
    expected = {f"e{i}" for i in range(n)}
    events.sort(key=lambda e: (e[0], e[1]))  # an end before a start at a tie
    running = most = 0
    for _, step in events:
        running += step
        most = max(most, running)
    twice = sorted(k for k, v in starts.items() if v > 1)
    return {
        "started": len(starts),
        "started_twice": len(twice),
        "started_twice_ids": twice[:10],
        "never_started": len(expected - set(starts)),
        "unknown_ids": len(set(starts) - expected),
        "ended": len(ends),
        "max_overlap": most,
        "limit_held": limit <= 0 or most <= limit,
        "runs_per_worker": sorted(pids.values(), reverse=True),
    }


def merge_stats(paths: list[str]) -> dict[str, dict[str, float]]:
    total: dict[str, dict[str, float]] = {}
    for path in paths:
        try:
            with open(path) as f:
                data = json.load(f)
        except (OSError, ValueError):
            continue
        for name, s in data.items():
            t = total.setdefault(name, {})
            for k, v in s.items():
                t[k] = t.get(k, 0) + v
    for s in total.values():
        calls = s.get("calls") or 1
        s["wall_ms_per_call"] = round(s["wall_s"] / calls * 1e3, 3)
        s["cpu_ms_per_call"] = round(s["cpu_s"] / calls * 1e3, 3)
        s["wall_s"] = round(s["wall_s"], 2)
        s["cpu_s"] = round(s["cpu_s"], 2)
    return total


def drain_once(
    n: int,
    k: int,
    limit: int,
    send_s: float,
    args: argparse.Namespace,
    children: Children,
    tmp: str,
) -> dict[str, Any]:
    label = f"limit={limit or None} K={k}"
    tag = f"{'limit' if limit else 'nolimit'}-k{k}-{time.monotonic_ns()}"
    ledger = os.path.join(tmp, f"ledger-{tag}")
    copy_queue()
    conn = pg_connect(DRAIN_DB)
    try:
        stats_files = [os.path.join(tmp, f"stats-{tag}-{i}.json") for i in range(k)]
        sampler = WaitSampler(DRAIN_DB)
        procs = []
        t_spawn = time.time()
        for i in range(k):
            env = drain_env(
                limit,
                ledger,
                BENCH_SCHEDULER=1,
                BENCH_WORKERS=args.threads,
                BENCH_POLL=args.poll,
                BENCH_STATS_OUT=stats_files[i],
            )
            procs.append(
                children.start(
                    [
                        sys.executable,
                        "-m",
                        "flask",
                        "--app",
                        "flow_app:create_app",
                        "durable",
                        "worker",
                    ],
                    env,
                    os.path.join(tmp, f"worker-{tag}-{i}.log"),
                )
            )
        meter = CpuMeter([p.pid for p in procs])
        meter.start()
        sampler.start()
        done = 0
        complete = True
        deadline = t_spawn + args.timeout
        try:
            while True:
                done = conn.execute(
                    "SELECT count(*) FROM durable_runs WHERE status = 'completed'"
                ).fetchone()[0]
                if done >= n:
                    break
                for p in procs:
                    if p.poll() is not None:
                        raise RuntimeError(
                            f"worker {p.pid} exited with {p.returncode}:\n"
                            + tail(p.log_path)  # type: ignore[attr-defined]
                        )
                if time.time() > deadline:
                    complete = False
                    log(f"{label}: only {done} of {n} completed after {args.timeout} s")
                    break
                time.sleep(0.2)
            t_seen = time.time()
            cpu = meter.stop()
        finally:
            sampler.halt.set()
            sampler.join(2)
            for p in procs:
                children.stop(p)
        cpu["database_backends_cpu_s"] = round(sampler.backend_cpu(), 2)
        finished = [
            row[0]
            for row in conn.execute(
                "SELECT finished_at FROM durable_runs WHERE status = 'completed'"
                " ORDER BY finished_at"
            ).fetchall()
        ]
        (reclaimed,) = conn.execute(
            "SELECT count(*) FROM durable_runs WHERE attempt > 1"
        ).fetchone()
        statuses = dict(
            conn.execute(
                "SELECT status, count(*) FROM durable_runs GROUP BY status"
            ).fetchall()
        )
    finally:
        conn.close()
    first, last = finished[0], finished[-1]
    span = max(last - first, 1e-9)
    lo, hi = (
        finished[int(0.1 * (len(finished) - 1))],
        finished[int(0.9 * (len(finished) - 1))],
    )
    steady = (
        (bisect.bisect_right(finished, hi) - bisect.bisect_left(finished, lo))
        / max(hi - lo, 1e-9)
        if hi > lo
        else float("nan")
    )
    wall = cpu["wall_s"] or 1e-9
    done = len(finished)
    result = {
        "limit": limit or None,
        "k": k,
        "runs": n,
        "threads_per_worker": args.threads,
        "completed": done,
        "complete": complete,
        "statuses_after": statuses,
        "send_s": round(send_s, 2),
        "first_done_after_spawn_s": round(first - t_spawn, 2),
        "all_done_after_spawn_s": round(last - t_spawn, 2),
        "seen_after_last_s": round(t_seen - last, 2),
        "runs_per_s": round((done - 1) / span, 1),
        "steady_runs_per_s": round(steady, 1),
        "cpu": cpu,
        "workers_cpu_ms_per_run": round(cpu["workers_cpu_s"] / done * 1e3, 2),
        "backends_cpu_ms_per_run": round(
            cpu["database_backends_cpu_s"] / done * 1e3, 2
        ),
        "workers_cores": round(cpu["workers_cpu_s"] / wall, 2),
        "backends_cores": round(cpu["database_backends_cpu_s"] / wall, 2),
        # The rest of the machine: PostgreSQL's background processes and
        # other databases' sessions included (CpuMeter's "other" subtracts
        # only the PostgreSQL processes alive at the end: the pool's
        # overflow connections close during the drain).
        "other_cores": round(
            max(
                cpu["machine_busy_s"]
                - cpu["workers_cpu_s"]
                - cpu["database_backends_cpu_s"]
                - cpu["bench_cpu_s"],
                0.0,
            )
            / wall,
            2,
        ),
        "backends_seen": len(sampler.cpu),
        "runs_claimed_again": reclaimed,
        "pg_waits": sampler.report(),
        "store_calls": merge_stats(stats_files),
        "ledger": read_ledger(ledger, n, limit),
    }
    log(
        f"{label}: {result['runs_per_s']} runs/s"
        f" (steady {result['steady_runs_per_s']}),"
        f" all done {result['all_done_after_spawn_s']} s after spawn;"
        f" ledger {result['ledger']}"
    )
    return result


def drain_scenario(
    args: argparse.Namespace, children: Children
) -> list[dict[str, Any]]:
    results = []
    limits = [args.limit] + ([] if args.no_yardstick else [0])
    with temp_dir("flow-drain") as tmp:
        try:
            for limit in limits:
                send_s, statuses = retrying(
                    f"storing {args.runs} runs (limit={limit})",
                    lambda limit=limit: store_runs(args.runs, limit),
                )
                log(
                    f"limit={limit or None}: stored {args.runs} runs in"
                    f" {send_s:.1f} s ({statuses})"
                )
                for k in args.workers:
                    results.append(
                        retrying(
                            f"drain limit={limit} K={k}",
                            lambda k=k, limit=limit, send_s=send_s: drain_once(
                                args.runs, k, limit, send_s, args, children, tmp
                            ),
                        )
                    )
        finally:
            reset_db(DRAIN_DB, create=False)
            reset_db(TEMPLATE_DB, create=False)
    return results


# -- output ------------------------------------------------------------------


def fmt(value: Any) -> str:
    if isinstance(value, float):
        if value != value:
            return "-"
        if abs(value) >= 100:
            return f"{value:,.0f}"
        if abs(value) >= 10:
            return f"{value:.1f}"
        return f"{value:.2f}"
    if value is None:
        return "-"
    return str(value)


def table(rows: list[dict[str, Any]], cols: list[str]) -> str:
    cells = [[fmt(r.get(c)) for c in cols] for r in rows]
    widths = [max(len(c), *(len(x[i]) for x in cells)) for i, c in enumerate(cols)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(cols, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    for x in cells:
        lines.append("  ".join(v.ljust(w) for v, w in zip(x, widths, strict=True)))
    return "\n".join(lines)


def print_endpoint(ep: dict[str, Any]) -> None:
    print(
        "\n== 1. Happy path of a 3-step endpoint under a limit never reached"
        " (in process, test client)"
    )
    print(
        table(
            ep["rows"],
            [
                "db",
                "scheduler",
                "limit",
                "base_us",
                "limited_us",
                "added_us",
                "added_pct",
                "base_cpu_us",
                "limited_cpu_us",
                "added_cpu_us",
                "added_pg_us",
                "keyed_runs",
                "admit_cpu_us",
            ],
        )
    )
    print(
        f"  * {ep['rounds']} rounds; added_* = median of per-round differences;"
        " cpu = this process (request + scheduler threads); pg = the database's"
        " backends; keyed_runs = runs with a flow key in the table at the end;"
        " admit_cpu_us = CPU of one admission pass then (nothing queued), which"
        " the scheduler runs after every end of a limited run."
        f" Settings: {ep['settings']}"
    )


def print_breakdown(ep: dict[str, Any]) -> None:
    print(
        "\n   Store calls per request: calls x thread CPU us per call"
        " (an extra pass with wrappers)"
    )
    for label, per in ep["breakdown"].items():
        for name, methods in per.items():
            text = ", ".join(
                f"{m} {s['per_request']:g}x{s['cpu_us_per_call']:.0f}"
                for m, s in methods.items()
            )
            print(f"   {label:27} {name:12} {text}")


def print_drain(rows: list[dict[str, Any]]) -> None:
    print("\n== 2. Queue drain on PostgreSQL (flask durable worker processes)")
    out = []
    for r in rows:
        calls = r["store_calls"]
        admit = calls.get("admit", {})
        lock = calls.get("_lock_key", {})
        led = r["ledger"]
        out.append(
            {
                "limit": r["limit"],
                "K": r["k"],
                "runs": r["runs"],
                "runs/s": r["runs_per_s"],
                "steady/s": r["steady_runs_per_s"],
                "done_s": r["all_done_after_spawn_s"],
                "send_s": r["send_s"],
                "wk_ms/run": r["workers_cpu_ms_per_run"],
                "be_ms/run": r["backends_cpu_ms_per_run"],
                "wk_cores": r["workers_cores"],
                "be_cores": r["backends_cores"],
                "other": r["other_cores"],
                "admits": admit.get("calls"),
                "empty": admit.get("empty"),
                "lock_ms": lock.get("wall_ms_per_call"),
                "adv_wait": r["pg_waits"].get("active: Lock/advisory", 0.0),
                "overlap": led["max_overlap"],
                "twice": led["started_twice"],
                "missing": led["never_started"],
            }
        )
    print(table(out, list(out[0]) if out else []))
    print(
        "  * runs/s between the first and last finished_at (steady: 10%-90% of"
        " completions); done_s from starting the workers; *_ms/run CPU per run;"
        " wk = the workers, be = the database's backends (sampled every 100"
        " ms), other = the rest of the machine (PostgreSQL's background"
        " processes and other sessions included); admits/empty = Store.admit"
        " calls / calls that claimed nothing; lock_ms = mean wall time to get"
        " the key's advisory lock; adv_wait = mean backends waiting on it;"
        " overlap = most runs between their S and E ledger lines at once;"
        " twice/missing = event ids started more than once / never."
    )


def loadavg() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run")
    parser.add_argument(
        "--only",
        choices=["endpoint", "drain", "history"],
        help="history (never part of the default run): admission CPU vs"
        " finished runs under a limit",
    )
    parser.add_argument("--history-max", type=int, default=5000)
    parser.add_argument("--runs", type=int, help="queued runs (10,000; quick 1,000)")
    parser.add_argument("--workers", default="1,2", help="worker counts: 1,2")
    parser.add_argument("--threads", type=int, default=16, help="DURABLE_WORKERS")
    parser.add_argument("--limit", type=int, default=20, help="concurrency limit")
    parser.add_argument("--poll", type=float, default=1.0, help="poll interval")
    parser.add_argument("--timeout", type=float, help="per drain (s)")
    parser.add_argument("--rounds", type=int, help="happy path rounds (7; quick 3)")
    parser.add_argument("--batch-seconds", type=float, help="(0.25; quick 0.1)")
    parser.add_argument("--no-yardstick", action="store_true")
    parser.add_argument("--output", help="JSON file (default results/flow.json)")
    args = parser.parse_args()
    args.runs = args.runs or (1000 if args.quick else 10_000)
    args.workers = [int(x) for x in args.workers.split(",")]
    args.rounds = args.rounds or (3 if args.quick else 7)
    args.batch_seconds = args.batch_seconds or (0.1 if args.quick else 0.25)
    args.timeout = args.timeout or (120.0 if args.quick else 300.0)

    started = time.time()
    pg_missing = postgres_ok()
    if pg_missing:
        log(f"PostgreSQL unavailable ({pg_missing}): SQLite rows only")
    result: dict[str, Any] = {
        "scenario": "flow",
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "python": platform.python_version(),
        "cores": os.cpu_count(),
        "quick": args.quick,
        "loadavg_before": loadavg(),
    }
    children = Children()
    try:
        if args.only in (None, "endpoint"):
            result["endpoint"] = endpoint_scenario(args, pg_missing is None)
            print_endpoint(result["endpoint"])
            print_breakdown(result["endpoint"])
        if args.only == "history":
            result["history"] = history_scenario(args, pg_missing is None)
            print("\n== Admission pass (nothing queued) vs finished runs under a limit")
            print(
                table(
                    result["history"],
                    ["db", "keyed_runs", "admit_cpu_us", "fill_request_us"],
                )
            )
        if args.only in (None, "drain") and pg_missing is None:
            result["drain_settings"] = {
                "synchronous_commit": pg_setting("synchronous_commit"),
                "limit": args.limit,
                "threads_per_worker": args.threads,
                "poll_interval_s": args.poll,
                "send_batch": SEND_BATCH,
            }
            result["drain"] = drain_scenario(args, children)
            print_drain(result["drain"])
    finally:
        children.kill_all()
    result["loadavg_after"] = loadavg()
    result["seconds"] = round(time.time() - started, 1)
    print(f"\ntotal {result['seconds']:.0f} s, load average {result['loadavg_after']}")
    default = None if args.quick or args.only else os.path.join(RESULTS, "flow.json")
    output = args.output or default
    if output:
        os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
        with open(output, "w") as f:
            json.dump(result, f, indent=1)
        print(f"wrote {output}")
    bad = [
        r
        for r in result.get("drain", [])
        if not r["complete"]
        or r["ledger"]["started_twice"]
        or r["ledger"]["never_started"]
        or not r["ledger"]["limit_held"]
    ]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
