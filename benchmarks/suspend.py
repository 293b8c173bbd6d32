"""Suspend N durable runs, then measure memory and the wake-up of all of them.

Scenario (issue: "Suspend 10,000 runs (each sleeping 30 s) and measure the
process's RSS before and after and the time for all wake-ups to complete once
due. Target: RSS growth under 50 MB for 10,000 sleeping runs; all resumed
within 30 s of their due time on SQLite."):

1. An app with one durable endpoint: ``step.run("reserve")``, a sleep
   (``step.sleep_until`` a common instant by default, so that every run is due
   at the same moment, the hardest case; ``--relative`` uses
   ``step.sleep(...)`` instead), then ``step.run("confirm")`` and a JSON
   response. It is driven in-process with Flask's test client; every request
   must answer ``303`` (not followed). The scheduler runs in this process
   (``DURABLE_WORKERS`` threads, default 8).
2. Warm-up: a few hundred runs that sleep 1 s and are resumed, so that the
   resume threads, connection pool and imports exist before the baseline.
3. ``gc.collect()``; RSS (``VmRSS`` of ``/proc/self/status``) before, then
   create N runs, ``gc.collect()``; RSS after, and the in-memory scheduler
   state (APScheduler jobs, wake timers, active runs).
4. Wait for the due instant; from then on poll ``COUNT(*)`` of completed runs
   (a separate read connection) until all N are completed; report the time
   from the due instant to the last completion, the per-run lateness
   (``finished_at - due``) and the resumption rate. Aborts with a clear
   message after ``--timeout`` seconds (default 300).

``--profile`` samples the stacks of the resuming threads (an in-process
sampling profiler, ~1% overhead) during the wake-up and prints where they
spend their time, grouped by the innermost ``flask_durable`` function (which
query), and by the leaf frame.

Usage::

    .venv/bin/python benchmarks/suspend.py                  # 10,000 runs, SQLite
    .venv/bin/python benchmarks/suspend.py --quick          # 1,000 runs
    .venv/bin/python benchmarks/suspend.py --postgres       # PostgreSQL too
    .venv/bin/python benchmarks/suspend.py --runs 2000 --sleep 10 --profile

Writes ``benchmarks/results/suspend.json`` (``--quick`` writes nothing unless
``--output`` is given).
"""

from __future__ import annotations

import argparse
import collections
import gc
import json
import logging
import os
import platform
import resource
import shutil
import sqlite3
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
RESULTS = os.path.join(HERE, "results")
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

PG_ADMIN = os.environ.get("BENCH_PG_ADMIN_DSN", "postgresql://postgres@127.0.0.1:5432")
PG_DATABASE = "durable_bench_suspend"

RSS_TARGET_MB = 50.0
LATENESS_TARGET_S = 30.0


def log(message: str) -> None:
    print(f"[suspend {time.strftime('%H:%M:%S')}] {message}", flush=True)


def rss_mb() -> float:
    return _status_kb("VmRSS") / 1024.0


def hwm_mb() -> float:
    return _status_kb("VmHWM") / 1024.0


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def cpu_seconds() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def loadavg() -> str:
    try:
        with open("/proc/loadavg") as f:
            return " ".join(f.read().split()[:3])
    except OSError:
        return "?"


# -- an in-process sampling profiler ------------------------------------------


class StackSampler:
    """Samples the Python stacks of selected threads every ``interval``
    seconds (``sys._current_frames``) and aggregates them.

    For each sample of a thread it records the leaf frame, the innermost
    ``flask_durable`` frame (``claim_due``, ``write``, ``load_steps``: which
    query a thread is in, including time blocked in the driver) and whether
    the thread was idle (waiting for work in a pool queue or the scheduler).
    Sampling needs the GIL, so a thread in C code that holds the GIL is
    attributed late; shares are approximate, the ranking is what matters.
    """

    IDLE_LEAVES = {"_worker", "wait", "get", "_wait_for_tstate_lock", "select"}

    def __init__(self, prefixes: tuple[str, ...], interval: float = 0.005) -> None:
        self.prefixes = prefixes
        self.interval = interval
        self.samples = 0
        self.thread_samples = 0
        self.idle = 0
        self.leaf: collections.Counter[str] = collections.Counter()
        self.durable: collections.Counter[str] = collections.Counter()
        self.durable_stack: collections.Counter[str] = collections.Counter()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(
            target=self._loop, name="bench-sampler", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)

    def _loop(self) -> None:
        me = threading.get_ident()
        while not self._stop.wait(self.interval):
            names = {
                t.ident: t.name
                for t in threading.enumerate()
                if t.name.startswith(self.prefixes)
            }
            frames = sys._current_frames()
            self.samples += 1
            for ident, frame in frames.items():
                if ident == me or ident not in names:
                    continue
                self.thread_samples += 1
                self._record(frame)

    def _record(self, frame: Any) -> None:
        leaf = frame
        code = leaf.f_code
        fname = os.path.basename(code.co_filename)
        # A thread waiting for work: the pool's queue or a condition.
        chain = []
        f = frame
        while f is not None:
            chain.append(f)
            f = f.f_back
        in_durable = [
            fr
            for fr in chain
            if os.sep + "flask_durable" + os.sep in fr.f_code.co_filename
        ]
        if not in_durable and code.co_name in self.IDLE_LEAVES:
            self.idle += 1
            return
        if not in_durable and fname in ("threading.py", "thread.py", "queue.py"):
            self.idle += 1
            return
        self.leaf[f"{fname}:{code.co_name}"] += 1
        if in_durable:
            inner = in_durable[0].f_code
            self.durable[f"{os.path.basename(inner.co_filename)}:{inner.co_name}"] += 1
            path = " > ".join(
                f"{os.path.basename(fr.f_code.co_filename)[:-3]}.{fr.f_code.co_name}"
                for fr in reversed(in_durable[:4])
            )
            self.durable_stack[path] += 1
        else:
            self.durable["(outside flask_durable)"] += 1

    def report(self, top: int = 15) -> dict[str, Any]:
        busy = max(self.thread_samples - self.idle, 1)
        return {
            "samples": self.samples,
            "thread_samples": self.thread_samples,
            "idle_share": round(self.idle / max(self.thread_samples, 1), 3),
            "by_flask_durable_function": [
                (k, round(v / busy, 3)) for k, v in self.durable.most_common(top)
            ],
            "by_flask_durable_stack": [
                (k, round(v / busy, 3)) for k, v in self.durable_stack.most_common(top)
            ],
            "by_leaf": [(k, round(v / busy, 3)) for k, v in self.leaf.most_common(top)],
        }


class ThreadCPUProfile:
    """cProfile of the resuming threads, timed with each thread's own CPU
    clock (``time.thread_time``): where the CPU goes, not where threads
    wait. Installed by wrapping the scheduler's pool-thread entry points
    (the library is not modified); cProfile inflates Python-heavy code, so
    read the ranking and shares, not absolute times."""

    ENTRY_POINTS = ("_claim_and_resume", "_resume_claimed", "_drain", "sweep")

    def __init__(self) -> None:
        self._local = threading.local()
        self._lock = threading.Lock()
        self.profiles: list[Any] = []
        self._saved: dict[str, Any] = {}

    def install(self) -> None:
        import cProfile
        import functools

        from flask_durable.scheduler import Scheduler

        local = self._local

        def wrap(fn: Any) -> Any:
            @functools.wraps(fn)
            def wrapper(*a: Any, **kw: Any) -> Any:
                depth = getattr(local, "depth", 0)
                if depth == 0:
                    prof = getattr(local, "prof", None)
                    if prof is None:
                        prof = local.prof = cProfile.Profile(time.thread_time)
                        with self._lock:
                            self.profiles.append(prof)
                    local.depth = 1
                    prof.enable()
                    try:
                        return fn(*a, **kw)
                    finally:
                        prof.disable()
                        local.depth = 0
                return fn(*a, **kw)

            return wrapper

        for name in self.ENTRY_POINTS:
            self._saved[name] = getattr(Scheduler, name)
            setattr(Scheduler, name, wrap(self._saved[name]))

    def uninstall(self) -> None:
        from flask_durable.scheduler import Scheduler

        for name, fn in self._saved.items():
            setattr(Scheduler, name, fn)

    def report(self, top: int = 25) -> dict[str, Any]:
        import pstats

        if not self.profiles:
            return {}
        stats = pstats.Stats(self.profiles[0])
        for prof in self.profiles[1:]:
            stats.add(prof)
        raw = stats.stats  # type: ignore[attr-defined]
        total = sum(v[2] for v in raw.values()) or 1e-9

        def name(key: Any) -> str:
            filename, line, func = key
            parts = filename.split(os.sep)
            short = os.sep.join(parts[-2:]) if len(parts) > 1 else filename
            return f"{short}:{line}({func})"

        own = sorted(raw.items(), key=lambda kv: kv[1][2], reverse=True)[:top]
        cum = sorted(
            (kv for kv in raw.items() if "flask_durable" in kv[0][0]),
            key=lambda kv: kv[1][3],
            reverse=True,
        )[:top]
        by_pkg: collections.Counter[str] = collections.Counter()
        for (filename, _, func), v in raw.items():
            if "flask_durable" in filename:
                pkg = "flask_durable"
            elif "site-packages" in filename:
                pkg = filename.split("site-packages" + os.sep, 1)[1].split(os.sep)[0]
            elif filename == "~":
                pkg = "builtins/C: " + func.split(" of ")[0][:60]
            else:
                pkg = "stdlib: " + os.path.basename(filename)
            by_pkg[pkg] += v[2]
        return {
            "cpu_s_profiled": round(total, 3),
            "by_own_time": [(name(k), v[1], round(v[2] / total, 3)) for k, v in own],
            "flask_durable_by_cumulative_time": [
                (name(k), v[1], round(v[3] / total, 3)) for k, v in cum
            ],
            "own_time_by_package": [
                (k, round(v / total, 3)) for k, v in by_pkg.most_common(15)
            ],
        }


def print_cprofile(report: dict[str, Any]) -> None:
    if not report:
        return
    print(
        f"\nCPU profile of the resuming threads ({report['cpu_s_profiled']} s"
        " thread CPU under cProfile):"
    )
    print("  own CPU by package / C function:")
    for k, share in report["own_time_by_package"]:
        print(f"    {share:6.1%}  {k}")
    print("  own CPU, top functions (calls, share):")
    for k, calls, share in report["by_own_time"][:15]:
        print(f"    {share:6.1%}  {calls:>8}  {k}")
    print("  flask_durable functions by cumulative CPU (calls, share):")
    for k, calls, share in report["flask_durable_by_cumulative_time"]:
        print(f"    {share:6.1%}  {calls:>8}  {k}")


def print_profile(report: dict[str, Any]) -> None:
    print(
        f"\nstack samples: {report['samples']} rounds,"
        f" {report['thread_samples']} thread samples,"
        f" idle share {report['idle_share']:.0%} (threads waiting for work,"
        " APScheduler's threads included)"
    )
    for title, key in (
        (
            "busy samples by innermost flask_durable function",
            "by_flask_durable_function",
        ),
        (
            "busy samples by flask_durable call path (outer > inner)",
            "by_flask_durable_stack",
        ),
        ("busy samples by leaf frame", "by_leaf"),
    ):
        print(f"  {title}:")
        for name, share in report[key]:
            print(f"    {share:6.1%}  {name}")


#: Executions of the "confirm" step per run (a step executed twice for a run
#: without any crash means that two threads resumed the same run).
CALLS: collections.Counter[int] = collections.Counter()
CALLS_LOCK = threading.Lock()


class WarningCounter(logging.Handler):
    """Counts flask_durable warnings and errors by their message's start."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.counts: collections.Counter[str] = collections.Counter()

    def emit(self, record: logging.LogRecord) -> None:
        msg = record.getMessage()
        key = msg.split(": ", 1)[1] if msg.startswith("run ") else msg
        self.counts[key[:80]] += 1


class ClaimDelays:
    """How long claimed runs wait between their claim (the lease starts) and
    the start of their replay; a wait longer than the lease means another
    thread or process may claim the run again. Installed by wrapping the
    app's ``store.claim``/``store.claim_due`` and ``scheduler.resume``
    instance attributes (the library is not modified). The scheduler got
    ``lifecycle.resume`` at its construction, so its own ``resume``
    attribute is the one to wrap."""

    def __init__(self, app: Any, lease: float) -> None:
        self.lifecycle = lifecycle = app.extensions["durable"]
        self.scheduler = scheduler = lifecycle.scheduler
        self.lease = lease
        self.claimed: dict[tuple[str, str], tuple[float, str]] = {}
        self.runs: collections.Counter[str] = collections.Counter()
        self.delays: list[tuple[float, str]] = []
        self.by_path: collections.Counter[str] = collections.Counter()
        store = lifecycle.store
        if scheduler.store is not store:
            raise RuntimeError("the scheduler does not use the lifecycle's store")
        orig_claim, orig_due = store.claim, store.claim_due
        orig_resume = self._orig_resume = scheduler.resume

        def claim(run_id: str, owner: str, *a: Any, **kw: Any) -> Any:
            found = orig_claim(run_id, owner, *a, **kw)
            if found is not None:
                self._note(found.id, owner, "timer (claim)")
            return found

        def claim_due(owner: str, *a: Any, **kw: Any) -> Any:
            claims = orig_due(owner, *a, **kw)
            caller = sys._getframe(1).f_code.co_name
            path = "drain (claim_due 1)" if caller == "_drain" else "sweep (claim_due)"
            for found in claims:
                self._note(found.id, owner, path)
            return claims

        def resume(claim: Any) -> Any:
            found = self.claimed.get((claim.id, claim.owner))
            if found is not None:
                self.delays.append((time.time() - found[0], found[1]))
            return orig_resume(claim)

        store.claim, store.claim_due = claim, claim_due
        scheduler.resume = resume

    def _note(self, run_id: str, owner: str, path: str) -> None:
        self.claimed[(run_id, owner)] = (time.time(), path)
        self.runs[run_id] += 1
        self.by_path[path] += 1

    def uninstall(self) -> None:
        store = self.lifecycle.store
        store.__dict__.pop("claim", None)
        store.__dict__.pop("claim_due", None)
        # The scheduler's resume was an instance attribute already (the
        # lifecycle's bound method): put it back.
        self.scheduler.resume = self._orig_resume

    def report(self) -> dict[str, Any]:
        d = sorted(self.delays) or [(0.0, "")]
        late = [(round(x, 2), path) for x, path in d if x > self.lease]
        return {
            "claims_by_path": dict(self.by_path),
            "runs_claimed_twice": sum(1 for v in self.runs.values() if v > 1),
            "delay_p50_s": round(d[len(d) // 2][0], 3),
            "delay_max_s": round(d[-1][0], 3),
            "delays_over_lease": late[:20],
        }


# -- the app --------------------------------------------------


def make_app(uri: str, workers: int, poll: float, lease: float) -> Any:
    from flask import Flask, jsonify, request

    from flask_durable import Durable, step

    app = Flask("suspend_bench")
    app.config.update(
        SECRET_KEY="bench",
        DURABLE_DATABASE_URI=uri,
        DURABLE_WORKERS=workers,
        DURABLE_POLL_INTERVAL=poll,
        DURABLE_LEASE_SECONDS=lease,
    )
    durable = Durable(app)

    def reserve(n: int) -> dict[str, Any]:
        return {"order": n, "seat": f"{n % 30}A", "price": 100 + n % 17}

    def confirm(order: dict[str, Any]) -> dict[str, Any]:
        with CALLS_LOCK:
            CALLS[order["order"]] += 1
        return {"confirmed": order["order"], "total": order["price"] * 1.2}

    @app.post("/nap")
    @durable.endpoint
    def nap() -> Any:
        body = request.get_json()
        order = step.run("reserve", reserve, body["n"])
        if body.get("until") is not None:
            step.sleep_until("nap", datetime.fromtimestamp(body["until"], timezone.utc))
        else:
            step.sleep("nap", body["sleep"])
        receipt = step.run("confirm", confirm, order)
        return jsonify(order=order, receipt=receipt)

    return app, durable


class Counter:
    """Counts completed runs created after ``since`` on its own connection."""

    def __init__(self, kind: str, target: str) -> None:
        self.kind = kind
        if kind == "sqlite":
            self.conn: Any = sqlite3.connect(target, timeout=30)
        else:
            import psycopg

            self.conn = psycopg.connect(target, autocommit=True)
        self.ph = "?" if kind == "sqlite" else "%s"

    def query(self, sql: str, *params: Any) -> list[Any]:
        cur = self.conn.cursor()
        cur.execute(sql.replace("?", self.ph), params)
        rows = cur.fetchall()
        cur.close()
        return rows

    def completed(self, since: float) -> tuple[int, int]:
        (row,) = self.query(
            "SELECT SUM(CASE WHEN status = 'completed' THEN 1 ELSE 0 END),"
            " SUM(CASE WHEN status IN ('failed', 'cancelled') THEN 1 ELSE 0 END)"
            " FROM durable_runs WHERE created_at >= ?",
            since,
        )
        return int(row[0] or 0), int(row[1] or 0)

    def close(self) -> None:
        self.conn.close()


def scheduler_state(app: Any) -> dict[str, int]:
    lifecycle = app.extensions["durable"]
    sched = lifecycle.scheduler
    aps = sched._aps
    return {
        "aps_jobs": len(aps.get_jobs()) if aps is not None else 0,
        "wake_timers": len(sched._timers),
        "active_runs": len(lifecycle.active),
        "inflight": sched._inflight,
    }


def create_runs(
    client: Any, n: int, start: int, body: dict[str, Any]
) -> tuple[float, int]:
    bad = 0
    t0 = time.perf_counter()
    for i in range(start, start + n):
        rv = client.post("/nap", json=dict(body, n=i))
        if rv.status_code != 303:
            bad += 1
            if bad <= 3:
                log(f"unexpected status {rv.status_code}: {rv.get_data()[:200]!r}")
        rv.close()
    return time.perf_counter() - t0, bad


def wait_all(
    counter: Counter,
    since: float,
    n: int,
    timeout: float,
    app: Any,
    progress_every: float = 5.0,
) -> tuple[bool, list[tuple[float, int]], int]:
    """Poll until ``n`` runs created since ``since`` are completed; returns
    (done, [(time, completed)], max wake timers seen)."""
    timeline: list[tuple[float, int]] = []
    deadline = time.time() + timeout
    last_print = time.time()
    max_timers = 0
    while True:
        done, failed = counter.completed(since)
        now = time.time()
        timeline.append((now, done))
        max_timers = max(max_timers, scheduler_state(app)["wake_timers"])
        if done + failed >= n:
            if failed:
                log(f"{failed} runs failed or were cancelled")
            return done == n, timeline, max_timers
        if now > deadline:
            return False, timeline, max_timers
        if now - last_print >= progress_every:
            log(f"  {done}/{n} completed")
            last_print = now
        time.sleep(0.1)


def measure(
    backend: str, uri: str, count_target: str, args: argparse.Namespace
) -> dict[str, Any]:
    from flask_durable.store import Store  # noqa: F401  (import cost in warm-up)

    n = args.runs
    app, durable = make_app(uri, args.workers, args.poll, args.lease)
    client = app.test_client()
    with app.app_context():
        app.extensions["durable"].ensure_ready()
    counter = Counter(backend, count_target)
    result: dict[str, Any] = {"backend": backend, "runs": n}
    try:
        # -- warm-up: the same path end to end, resumed by the scheduler ----
        warm = min(300, max(50, n // 20))
        t_warm = time.time()
        warm_took, _ = create_runs(client, warm, 0, {"sleep": 1.0})
        ok, _, _ = wait_all(counter, t_warm, warm, 60, app)
        if not ok:
            raise RuntimeError("warm-up runs did not complete within 60 s")
        time.sleep(0.5)

        # -- baseline -------------------------------------------------------
        gc.collect()
        rss_before = rss_mb()
        objects_before = len(gc.get_objects())
        sched_before = scheduler_state(app)

        # -- suspend N runs ---------------------------------------------------
        t_batch = time.time()
        sleep = args.sleep
        if args.relative:
            body: dict[str, Any] = {"sleep": args.sleep}
            due = None
        else:
            # All runs must be created before the common instant: if the
            # warm-up's creation rate says they would not be, sleep longer.
            estimate = warm_took / warm * n * 1.5 + 3.0
            if estimate > sleep:
                sleep = float(10 * (int(estimate) // 10 + 1))
                log(
                    f"{backend}: creating {n} runs should take ~{estimate / 1.5:.0f} s;"
                    f" sleeping {sleep:.0f} s instead of {args.sleep:.0f} s so that"
                    " all are due at once"
                )
            due = t_batch + sleep
            body = {"until": due}
        log(
            f"{backend}: creating {n} runs"
            + (
                f" (all due at +{sleep:.0f} s)"
                if due
                else f" (each sleeping {args.sleep:.0f} s)"
            )
        )
        took, bad = create_runs(client, n, warm, body)
        created_at = time.time()
        gc.collect()
        rss_after = rss_mb()
        objects_after = len(gc.get_objects())
        sched_after = scheduler_state(app)
        suspended = counter.query(
            "SELECT COUNT(*) FROM durable_runs WHERE created_at >= ?"
            " AND status = 'sleeping'",
            t_batch,
        )[0][0]
        log(
            f"{backend}: created {n} runs in {took:.1f} s ({n / took:.0f}/s),"
            f" {suspended} sleeping, RSS {rss_before:.1f} -> {rss_after:.1f} MB"
        )
        if due is not None and created_at > due - 1.0:
            log(
                f"WARNING: creating the runs took longer than the sleep"
                f" ({took:.1f} s > {sleep:.0f} s - 1 s): runs became due while"
                " others were still being created; use a longer --sleep"
            )
        result.update(
            sleep_s=sleep,
            mode="relative" if args.relative else "common instant",
            workers=args.workers,
            poll_interval=args.poll,
            lease_s=args.lease,
            create_s=round(took, 2),
            create_per_s=round(n / took, 1),
            non_303=bad,
            sleeping_after_create=int(suspended),
            rss_before_mb=round(rss_before, 1),
            rss_after_mb=round(rss_after, 1),
            rss_growth_mb=round(rss_after - rss_before, 1),
            gc_objects_growth=objects_after - objects_before,
            scheduler_before=sched_before,
            scheduler_after=sched_after,
        )

        # -- wake-up ------------------------------------------------------------
        pre_timers = 0
        if due is not None:
            wait = due - time.time()
            log(f"{backend}: waiting {max(wait, 0):.1f} s for the due instant")
            if wait > 0.5:
                time.sleep(wait - 0.5)
                gc.collect()
                result["rss_before_due_mb"] = round(rss_mb(), 1)
            while time.time() < due:
                pre_timers = max(pre_timers, scheduler_state(app)["wake_timers"])
                time.sleep(0.01)
        else:
            # Each run is due args.sleep after its own creation.
            due_first = t_batch + args.sleep
            time.sleep(max(due_first - time.time() - 0.5, 0))
            gc.collect()
            result["rss_before_due_mb"] = round(rss_mb(), 1)
        cprof = None
        if args.cprofile:
            cprof = ThreadCPUProfile()
            cprof.install()
        sampler = None
        if args.profile:
            sampler = StackSampler(
                ("durable-resume", "ThreadPoolExecutor", "APScheduler")
            )
            sampler.start()
        delays = ClaimDelays(app, args.lease)
        warnings = WarningCounter()
        logging.getLogger("flask_durable").addHandler(warnings)
        CALLS.clear()
        cpu0 = cpu_seconds()
        t0 = time.time()
        ok, timeline, max_timers = wait_all(
            counter, t_batch, n, args.timeout + (0 if due else took), app
        )
        cpu = cpu_seconds() - cpu0
        if sampler is not None:
            sampler.stop()
        if cprof is not None:
            cprof.uninstall()
            result["cpu_profile"] = cprof.report()
        wall = time.time() - t0
        result["max_wake_timers_during_drain"] = max(max_timers, pre_timers)
        delays.uninstall()
        result["claim_to_resume"] = delays.report()
        time.sleep(0.5)  # late duplicates
        logging.getLogger("flask_durable").removeHandler(warnings)
        result["warnings"] = dict(warnings.counts)
        result["confirm_step_calls"] = sum(CALLS.values())
        result["runs_with_confirm_twice"] = sum(1 for v in CALLS.values() if v > 1)
        if not ok:
            done = timeline[-1][1] if timeline else 0
            result.update(aborted=True, completed=done)
            log(
                f"ABORTED: only {done}/{n} runs completed {wall:.0f} s after they"
                f" became due (limit --timeout {args.timeout:.0f} s)"
            )
            if sampler is not None:
                result["profile"] = sampler.report()
            return result

        # -- per-run lateness from the database ---------------------------------
        if due is not None:
            rows = counter.query(
                "SELECT finished_at - ? FROM durable_runs WHERE created_at >= ?",
                due,
                t_batch,
            )
        else:
            rows = counter.query(
                "SELECT r.finished_at - (s.started_at + ?) FROM durable_runs r"
                " JOIN durable_steps s ON s.run_id = r.id AND s.step_id = 'nap'"
                " WHERE r.created_at >= ?",
                args.sleep,
                t_batch,
            )
        late = sorted(float(r[0]) for r in rows)
        finished = counter.query(
            "SELECT MIN(finished_at), MAX(finished_at) FROM durable_runs"
            " WHERE created_at >= ?",
            t_batch,
        )[0]
        first, last = float(finished[0]), float(finished[1])

        def pct(p: float) -> float:
            return late[min(len(late) - 1, int(p * len(late)))]

        # Steady rate: between 10% and 90% of the runs finished.
        fin = sorted(
            float(r[0])
            for r in counter.query(
                "SELECT finished_at FROM durable_runs WHERE created_at >= ?", t_batch
            )
        )
        lo, hi = fin[int(0.1 * n)], fin[int(0.9 * n) - 1]
        steady = (0.8 * n) / (hi - lo) if hi > lo else float("nan")
        gc.collect()
        span = (last - due) if due is not None else (last - first)
        result.update(
            aborted=False,
            lateness_p50_s=round(pct(0.5), 3),
            lateness_p90_s=round(pct(0.9), 3),
            lateness_max_s=round(late[-1], 3),
            first_done_after_due_s=round(first - due, 3) if due else None,
            all_done_after_due_s=round(last - due, 3) if due else None,
            resume_per_s=round(n / span, 1) if span > 0 else None,
            resume_steady_per_s=round(steady, 1),
            cpu_s_during_drain=round(cpu, 2),
            cpu_ms_per_resume=round(1000 * cpu / n, 3),
            cpu_utilization=round(cpu / wall, 2),
            rss_after_drain_mb=round(rss_mb(), 1),
            rss_peak_mb=round(hwm_mb(), 1),
            scheduler_after_drain=scheduler_state(app),
        )
        if sampler is not None:
            result["profile"] = sampler.report()
        return result
    finally:
        counter.close()
        with app.app_context():
            durable.shutdown()


def print_table(results: list[dict[str, Any]]) -> None:
    rows = [
        ("runs", "runs", "{}"),
        ("sleep mode", "mode", "{}"),
        ("resume threads (DURABLE_WORKERS)", "workers", "{}"),
        ("create: runs/s", "create_per_s", "{}"),
        ("RSS before (MB)", "rss_before_mb", "{}"),
        ("RSS after creating (MB)", "rss_after_mb", "{}"),
        ("RSS growth (MB)", "rss_growth_mb", "{}"),
        ("gc objects growth", "gc_objects_growth", "{}"),
        ("APScheduler jobs while sleeping", "scheduler_after", "{}"),
        ("max wake timers during wake-up", "max_wake_timers_during_drain", "{}"),
        ("first completed after due (s)", "first_done_after_due_s", "{}"),
        ("all completed after due (s)", "all_done_after_due_s", "{}"),
        ("lateness p50 / p90 / max (s)", None, None),
        ("resumed runs/s (N / span)", "resume_per_s", "{}"),
        ("resumed runs/s (10%-90%)", "resume_steady_per_s", "{}"),
        ("CPU ms per resumed run", "cpu_ms_per_resume", "{}"),
        ("process CPU utilization", "cpu_utilization", "{} cores"),
        ("RSS after wake-up / peak (MB)", None, None),
        ("'confirm' step executions", "confirm_step_calls", "{}"),
        ("runs whose 'confirm' ran twice", "runs_with_confirm_twice", "{}"),
        ("flask_durable warnings", "warnings", "{}"),
        ("claims: timer / sweep / drain", None, None),
        ("claimed twice; claim->replay max (s)", None, None),
    ]
    width = 36
    header = f"{'':<{width}}" + "".join(f"{r['backend']:>26}" for r in results)
    print("\n" + header)
    print("-" * len(header))
    for label, key, fmt in rows:
        cells = []
        for r in results:
            if label.startswith("lateness"):
                v = (
                    f"{r.get('lateness_p50_s')} / {r.get('lateness_p90_s')} /"
                    f" {r.get('lateness_max_s')}"
                )
            elif label.startswith("RSS after wake"):
                v = f"{r.get('rss_after_drain_mb')} / {r.get('rss_peak_mb')}"
            elif label.startswith("claims:"):
                c = (r.get("claim_to_resume") or {}).get("claims_by_path", {})
                v = (
                    f"{c.get('timer (claim)', 0)} / {c.get('sweep (claim_due)', 0)}"
                    f" / {c.get('drain (claim_due 1)', 0)}"
                )
            elif label.startswith("claimed twice"):
                c = r.get("claim_to_resume") or {}
                v = f"{c.get('runs_claimed_twice')}; {c.get('delay_max_s')}"
            elif key == "warnings":
                v = str(sum((r.get(key) or {}).values()))
            elif key == "scheduler_after":
                s = r.get(key) or {}
                v = f"{s.get('aps_jobs')} (+{s.get('wake_timers')} timers)"
            else:
                value = r.get(key)
                v = "-" if value is None else fmt.format(value)
            cells.append(f"{v:>26}")
        print(f"{label:<{width}}" + "".join(cells))
    print()
    for r in results:
        if r.get("aborted"):
            verdict = "ABORTED"
        else:
            rss_ok = r["rss_growth_mb"] * 10_000 / r["runs"] < RSS_TARGET_MB
            late_ok = r["lateness_max_s"] <= LATENESS_TARGET_S
            verdict = (
                f"RSS growth {r['rss_growth_mb']} MB for {r['runs']} runs"
                f" ({'met' if rss_ok else 'MISSED'}: < {RSS_TARGET_MB:.0f} MB"
                " per 10,000); all resumed within"
                f" {r['lateness_max_s']} s of due"
                f" ({'met' if late_ok else 'MISSED'}: <= {LATENESS_TARGET_S:.0f} s)"
            )
        print(f"{r['backend']}: {verdict}")
        for msg, count in (r.get("warnings") or {}).items():
            print(f"  warning x{count}: {msg}")
        late = (r.get("claim_to_resume") or {}).get("delays_over_lease")
        if late:
            print(
                f"  {len(late)} claimed runs waited longer than the lease"
                f" ({r['lease_s']:.0f} s) before their replay started"
                f" (seconds, claimed by): {late}"
            )
        if "profile" in r:
            print_profile(r["profile"])
        if "cpu_profile" in r:
            print_cprofile(r["cpu_profile"])


def pg_admin(sql: str) -> None:
    import psycopg

    with psycopg.connect(f"{PG_ADMIN}/postgres", autocommit=True) as conn:
        conn.execute(sql)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=10_000)
    parser.add_argument("--sleep", type=float, default=30.0, help="seconds (30)")
    parser.add_argument("--quick", action="store_true", help="1,000 runs")
    parser.add_argument(
        "--relative",
        action="store_true",
        help="step.sleep(SLEEP) per run instead of step.sleep_until a common instant",
    )
    parser.add_argument("--workers", type=int, default=8, help="DURABLE_WORKERS (8)")
    parser.add_argument("--poll", type=float, default=1.0, help="DURABLE_POLL_INTERVAL")
    parser.add_argument(
        "--lease", type=float, default=15.0, help="DURABLE_LEASE_SECONDS"
    )
    parser.add_argument("--postgres", action="store_true", help="PostgreSQL too")
    parser.add_argument("--no-sqlite", action="store_true")
    parser.add_argument("--timeout", type=float, default=300.0)
    parser.add_argument(
        "--profile", action="store_true", help="sample the resuming threads' stacks"
    )
    parser.add_argument(
        "--cprofile",
        action="store_true",
        help="cProfile (thread CPU time) of the resuming threads; slows them",
    )
    parser.add_argument("--output", default=None)
    args = parser.parse_args()
    if args.quick:
        args.runs = 1000
    output = args.output
    if output is None and not args.quick:
        output = os.path.join(RESULTS, "suspend.json")
    logging.basicConfig(level=logging.WARNING)

    log(f"load average before: {loadavg()} ({os.cpu_count()} cores)")
    results = []
    os.makedirs(RESULTS, exist_ok=True)
    if not args.no_sqlite:
        tmp = tempfile.mkdtemp(prefix="suspend-", suffix=".tmp", dir=RESULTS)
        try:
            path = os.path.join(tmp, "durable.sqlite3")
            results.append(measure("sqlite", f"sqlite:///{path}", path, args))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    if args.postgres:
        pg_admin(f"DROP DATABASE IF EXISTS {PG_DATABASE} WITH (FORCE)")
        pg_admin(f"CREATE DATABASE {PG_DATABASE}")
        try:
            results.append(
                measure(
                    "postgresql",
                    f"postgresql+psycopg://postgres@127.0.0.1:5432/{PG_DATABASE}",
                    f"{PG_ADMIN}/{PG_DATABASE}",
                    args,
                )
            )
        finally:
            pg_admin(f"DROP DATABASE IF EXISTS {PG_DATABASE} WITH (FORCE)")
    print_table(results)
    log(f"load average after: {loadavg()}")
    if output:
        with open(output, "w") as f:
            json.dump(
                {
                    "scenario": "suspend",
                    "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                    "python": platform.python_version(),
                    "cores": os.cpu_count(),
                    "loadavg_after": loadavg(),
                    "targets": {
                        "rss_growth_mb_per_10000": RSS_TARGET_MB,
                        "max_lateness_s": LATENESS_TARGET_S,
                    },
                    "results": results,
                },
                f,
                indent=2,
            )
            f.write("\n")
        log(f"wrote {os.path.relpath(output, ROOT)}")
    return 1 if any(r.get("aborted") for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
