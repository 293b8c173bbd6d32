"""Recovery after SIGKILL, and resumption throughput with 1, 2 and 4 workers.

Scenario (issue: "Recovery time (SIGKILL to the run finished elsewhere) and
resumed runs per second with 1, 2 and 4 worker processes on PostgreSQL.
Target: recovery within lease + 1 s; resumptions scale at least 1.6x from 1
to 2 workers on this 2-core machine."). PostgreSQL only (database
``durable_bench_scale``, dropped and recreated; dropped at the end). The app
of the child processes is ``benchmarks/scaleout_app.py``.

**Recovery.** A Werkzeug server (threaded, ``DURABLE_LEASE_SECONDS=5``,
``DURABLE_POLL_INTERVAL=0.5``, scheduler on) and one ``flask durable worker``
process share the database. A run of ``/recover`` is started on the server;
its second step leaves a marker file and blocks. A random 0.2-1.9 s later the
server is SIGKILLed (random phase against its lease heartbeat, which renews
every lease/3), the step's release file is created, and we poll the database
until the run is ``completed``. Reported per repetition: SIGKILL ->
``finished_at`` (the recovery time), SIGKILL -> the lease expiry that was
stored at the kill, and lease expiry -> ``finished_at`` (detection by the
worker's sweeper plus the replay). Target: recovery <= lease + 1 s; the
design bound is lease + poll interval + replay time.

**Throughput.** For each K in 1, 2, 4 (rounds alternate the K order; the
database is recreated before each): M runs of ``/work`` (``step.run
prepare``, ``step.sleep_until`` a common instant, ``step.run charge`` (JSON +
SHA-256), ``step.run notify``) are created in this process with
``DURABLE_SCHEDULER=False`` (Flask test client, every answer a 303), all
sleeping until far in the future. K ``flask durable worker`` processes
(``DURABLE_WORKERS`` threads each, default 8) are started and become ready;
then one transaction moves the sleep of every run (the run's ``due_at`` and
the sleep step's ``due_at``) to a common instant X = now + 3 s, exactly the
state ``step.sleep_until(X)`` would have stored, so the workers' exact wake
timers (set for runs due within 1.5 poll intervals) take part as they would
in production. From X we poll until all M are completed. Reported: resumed
runs/s (M / (last finished - X)) and the steady rate (10%-90% of
completions), the scaling ratios (median of per-round ratios), CPU seconds
per resumed run of the workers and of PostgreSQL, the machine's CPU use
during the drain (workers, PostgreSQL, this script, everything else = noise
from other processes), pg_stat_activity wait events of our database sampled
every 100 ms, and step re-executions (a ``charge`` step with attempts > 1).

``--profile`` adds a stack-sample profile of the workers' resuming threads
(``BENCH_SAMPLE_OUT``), ``--cprofile`` a cProfile by thread CPU
(``BENCH_CPROFILE_OUT``); both slow the workers a little (cProfile a lot).

Usage::

    .venv/bin/python benchmarks/scaleout.py              # full (~3-4 minutes)
    .venv/bin/python benchmarks/scaleout.py --quick      # smoke run
    .venv/bin/python benchmarks/scaleout.py --only throughput --runs 3000

Writes ``benchmarks/results/scaleout.json`` (``--quick`` writes nothing
unless ``--output`` is given).
"""

from __future__ import annotations

import argparse
import atexit
import collections
import glob
import http.client
import json
import os
import platform
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
RESULTS = os.path.join(HERE, "results")

PG_ADMIN = os.environ.get("BENCH_PG_ADMIN_DSN", "postgresql://postgres@127.0.0.1:5432")
PG_DATABASE = "durable_bench_scale"
PG_DSN = f"{PG_ADMIN}/{PG_DATABASE}"
APP_URL = "postgresql+psycopg://" + PG_DSN.split("://", 1)[1]

CLK_TCK = os.sysconf("SC_CLK_TCK")
SCALING_TARGET = 1.6


def log(message: str) -> None:
    print(f"[scaleout {time.strftime('%H:%M:%S')}] {message}", flush=True)


# -- child processes --------------------------------------------------


class Children:
    """Every child process we start; all are killed at exit, even on error."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []
        atexit.register(self.kill_all)

    def start(
        self, argv: list[str], env: dict[str, str], log_path: str
    ) -> subprocess.Popen[bytes]:
        out = open(log_path, "ab")  # noqa: SIM115 (closed with the process)
        try:
            proc = subprocess.Popen(
                argv,
                cwd=HERE,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        finally:
            out.close()
        proc.log_path = log_path  # type: ignore[attr-defined]
        self.procs.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen[bytes], timeout: float = 15.0) -> None:
        """SIGTERM (a graceful stop), then SIGKILL."""
        if proc.poll() is None:
            try:
                proc.send_signal(signal.SIGTERM)
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
            except ProcessLookupError:
                pass
        if proc in self.procs:
            self.procs.remove(proc)

    def forget(self, proc: subprocess.Popen[bytes]) -> None:
        if proc in self.procs:
            self.procs.remove(proc)

    def kill_all(self) -> None:
        for proc in list(self.procs):
            if proc.poll() is None:
                try:
                    proc.kill()
                    proc.wait(5)
                except (ProcessLookupError, subprocess.TimeoutExpired):
                    pass
            self.procs.remove(proc)


def child_env(**extra: Any) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([HERE, ROOT, env.get("PYTHONPATH", "")])
    env["BENCH_DB_URL"] = APP_URL
    env.pop("FLASK_APP", None)
    env.update({k: str(v) for k, v in extra.items()})
    return env


def tail(path: str, lines: int = 15) -> str:
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-lines:])
    except OSError:
        return ""


def start_worker(
    children: Children, env: dict[str, str], log_path: str
) -> subprocess.Popen[bytes]:
    return children.start(
        [
            sys.executable,
            "-m",
            "flask",
            "--app",
            "scaleout_app:create_app",
            "durable",
            "worker",
        ],
        env,
        log_path,
    )


def wait_ready(procs: list[subprocess.Popen[bytes]], timeout: float = 60.0) -> None:
    """Until every worker printed its banner (its scheduler is running)."""
    deadline = time.time() + timeout
    pending = list(procs)
    while pending:
        for proc in list(pending):
            path = proc.log_path  # type: ignore[attr-defined]
            if proc.poll() is not None:
                raise RuntimeError(
                    f"worker {proc.pid} exited with {proc.returncode}:\n{tail(path)}"
                )
            with open(path, errors="replace") as f:
                if "flask-durable worker for" in f.read():
                    pending.remove(proc)
        if time.time() > deadline:
            raise RuntimeError(f"workers not ready after {timeout} s")
        time.sleep(0.05)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def http_request(
    port: int, method: str, path: str, body: bytes = b"", timeout: float = 5.0
) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(
            method, path, body=body, headers={"Content-Type": "application/json"}
        )
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def start_server(
    children: Children, env: dict[str, str], log_path: str
) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    proc = children.start(
        [sys.executable, os.path.join(HERE, "scaleout_app.py"), "serve", str(port)],
        env,
        log_path,
    )
    deadline = time.time() + 30
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited:\n{tail(log_path)}")
        try:
            # The first request also starts the server's scheduler
            # (heartbeats renew the leases of its runs).
            if http_request(port, "GET", "/health", timeout=2)[0] == 200:
                return proc, port
        except OSError:
            pass
        if time.time() > deadline:
            raise RuntimeError(f"server not up after 30 s:\n{tail(log_path)}")
        time.sleep(0.05)


# -- database and CPU accounting ---------------------------------------------------


def pg_admin(sql: str) -> None:
    import psycopg

    with psycopg.connect(f"{PG_ADMIN}/postgres", autocommit=True) as conn:
        conn.execute(sql)


def reset_db() -> None:
    pg_admin(f"DROP DATABASE IF EXISTS {PG_DATABASE} WITH (FORCE)")
    pg_admin(f"CREATE DATABASE {PG_DATABASE}")


def connect() -> Any:
    import psycopg

    return psycopg.connect(PG_DSN, autocommit=True)


def proc_cpu(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLK_TCK
    except (OSError, IndexError, ValueError):
        return None


def machine_cpu() -> tuple[float, float]:
    """(busy, total) CPU seconds of the machine since boot."""
    with open("/proc/stat") as f:
        parts = [int(x) for x in f.readline().split()[1:]]
    idle = parts[3] + (parts[4] if len(parts) > 4 else 0)
    total = sum(parts[:8])
    return (total - idle) / CLK_TCK, total / CLK_TCK


def postgres_pids() -> list[int]:
    pids = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/comm") as f:
                if f.read().strip().startswith("postgres"):
                    pids.append(int(name))
        except OSError:
            pass
    return pids


class CpuMeter:
    """CPU seconds used between ``start()`` and ``stop()`` by the workers,
    all PostgreSQL processes, this script, and the whole machine."""

    def __init__(self, workers: list[int]) -> None:
        self.workers = workers

    def _snap(self) -> dict[str, Any]:
        pg = {pid: proc_cpu(pid) for pid in postgres_pids()}
        return {
            "t": time.time(),
            "workers": {pid: proc_cpu(pid) for pid in self.workers},
            "pg": pg,
            "self": proc_cpu(os.getpid()),
            "machine": machine_cpu(),
        }

    def start(self) -> None:
        self.a = self._snap()

    def stop(self) -> dict[str, float]:
        b = self._snap()
        a = self.a
        wall = b["t"] - a["t"]

        def delta(x: dict[int, float | None], y: dict[int, float | None]) -> float:
            total = 0.0
            for pid, v in y.items():
                if v is None:
                    continue
                total += v - (x.get(pid) or 0.0)  # new backends count from 0
            return total

        workers = delta(a["workers"], b["workers"])
        pg = delta(a["pg"], b["pg"])
        me = (b["self"] or 0) - (a["self"] or 0)
        busy = b["machine"][0] - a["machine"][0]
        total = b["machine"][1] - a["machine"][1]
        return {
            "wall_s": round(wall, 3),
            "workers_cpu_s": round(workers, 2),
            "postgres_cpu_s": round(pg, 2),
            "bench_cpu_s": round(me, 2),
            "machine_busy_s": round(busy, 2),
            "machine_capacity_s": round(total, 2),
            "other_cpu_s": round(max(busy - workers - pg - me, 0.0), 2),
        }


# -- recovery --------------------------------------------------


def recovery(args: argparse.Namespace, children: Children, tmp: str) -> dict[str, Any]:
    reset_db()
    barrier = os.path.join(tmp, "barrier")
    os.makedirs(barrier, exist_ok=True)
    env = child_env(
        BENCH_LEASE=args.lease,
        BENCH_POLL=args.poll,
        BENCH_BARRIER_DIR=barrier,
        BENCH_WORKERS=8,
    )
    worker = start_worker(children, env, os.path.join(tmp, "recovery-worker.log"))
    wait_ready([worker])
    conn = connect()
    reps: list[dict[str, Any]] = []
    try:
        for rep in range(args.reps):
            server, port = start_server(
                children, env, os.path.join(tmp, f"server-{rep}.log")
            )
            outcome: dict[str, Any] = {}

            def post(port: int = port, outcome: dict[str, Any] = outcome) -> None:
                try:
                    outcome["status"] = http_request(
                        port, "POST", "/recover", b"{}", timeout=args.lease * 4 + 60
                    )[0]
                except Exception as e:  # the server is killed: expected
                    outcome["error"] = type(e).__name__

            client = threading.Thread(target=post, daemon=True)
            client.start()
            deadline = time.time() + 30
            marker = []
            while not marker:
                marker = glob.glob(os.path.join(barrier, f"*.{server.pid}.started"))
                if time.time() > deadline:
                    raise RuntimeError(
                        f"the blocking step never started:\n{tail(server.log_path)}"  # type: ignore[attr-defined]
                    )
                time.sleep(0.005)
            run_id = os.path.basename(marker[0]).split(".", 1)[0]
            time.sleep(random.uniform(0.2, max(args.lease / 3 + 0.2, 0.3)))
            t_kill = time.time()
            os.kill(server.pid, signal.SIGKILL)
            server.wait()
            children.forget(server)
            with open(os.path.join(barrier, f"{run_id}.release"), "w"):
                pass
            (expires, owner) = conn.execute(
                "SELECT lease_expires_at, lease_owner FROM durable_runs WHERE id = %s",
                (run_id,),
            ).fetchone()
            deadline = time.time() + args.lease * 3 + 30
            while True:
                row = conn.execute(
                    "SELECT status, finished_at FROM durable_runs WHERE id = %s",
                    (run_id,),
                ).fetchone()
                if row[0] in ("completed", "failed", "cancelled"):
                    break
                if time.time() > deadline:
                    raise RuntimeError(
                        f"run {run_id} not finished {args.lease * 3 + 30:.0f} s after"
                        f" SIGKILL (status {row[0]}):\n" + tail(worker.log_path)  # type: ignore[attr-defined]
                    )
                time.sleep(0.01)
            status, finished = row
            resumed = glob.glob(os.path.join(barrier, f"{run_id}.{worker.pid}.started"))
            restarted = None
            if resumed:
                with open(resumed[0]) as f:
                    restarted = float(f.read())
            client.join(5)
            item = {
                "run_id": run_id,
                "status": status,
                "recovery_s": round(finished - t_kill, 3),
                "lease_left_at_kill_s": round(expires - t_kill, 3),
                "detect_after_expiry_s": round(restarted - expires, 3)
                if restarted
                else None,
                "finish_after_expiry_s": round(finished - expires, 3),
                "finished_by_worker": bool(resumed),
                "client": outcome.get("error") or outcome.get("status"),
                "lease_owner_at_kill": owner,
            }
            reps.append(item)
            log(
                f"recovery {rep + 1}/{args.reps}: {item['recovery_s']:.2f} s"
                f" (lease left at kill {item['lease_left_at_kill_s']:.2f} s,"
                f" finished {item['finish_after_expiry_s']:.2f} s after expiry)"
            )
    finally:
        conn.close()
        children.stop(worker)
    times = [r["recovery_s"] for r in reps]
    bound = args.lease + 1.0
    return {
        "lease_s": args.lease,
        "poll_interval_s": args.poll,
        "repetitions": reps,
        "recovery_min_s": min(times),
        "recovery_median_s": statistics.median(times),
        "recovery_max_s": max(times),
        "target_s": bound,
        "design_bound_s": args.lease + args.poll + 1.0,
        "target_met": max(times) <= bound,
    }


# -- throughput --------------------------------------------------


def create_runs(m: int) -> float:
    """Create ``m`` runs of ``/work`` sleeping until far in the future, in
    this process, without a scheduler. Returns the seconds it took."""
    os.environ.update(child_env(BENCH_SCHEDULER=0))
    if HERE not in sys.path:
        sys.path.insert(0, HERE)
    import scaleout_app

    app = scaleout_app.create_app()
    client = app.test_client()
    far = time.time() + 86400
    t0 = time.perf_counter()
    bad = 0
    try:
        for i in range(m):
            rv = client.post("/work", json={"n": i, "until": far})
            if rv.status_code != 303:
                bad += 1
                if bad <= 3:
                    log(f"unexpected {rv.status_code}: {rv.get_data()[:200]!r}")
            rv.close()
    finally:
        with app.app_context():
            app.extensions["durable"].close()
    if bad:
        raise RuntimeError(f"{bad} of {m} runs did not suspend (no 303)")
    return time.perf_counter() - t0


def throughput_round(
    k: int, args: argparse.Namespace, children: Children, tmp: str, tag: str
) -> dict[str, Any]:
    m = args.runs
    reset_db()
    took = create_runs(m)
    diag: dict[int, dict[str, str]] = {}
    workers = []
    try:
        for i in range(k):
            extra: dict[str, Any] = {"BENCH_WORKERS": args.threads}
            files: dict[str, str] = {}
            if args.profile:
                files["samples"] = os.path.join(tmp, f"samples-{tag}-{i}.json")
                extra["BENCH_SAMPLE_OUT"] = files["samples"]
            if args.cprofile:
                files["cprofile"] = os.path.join(tmp, f"cprofile-{tag}-{i}.json")
                extra["BENCH_CPROFILE_OUT"] = files["cprofile"]
            proc = start_worker(
                children, child_env(**extra), os.path.join(tmp, f"worker-{tag}-{i}.log")
            )
            workers.append(proc)
            diag[proc.pid] = files
        wait_ready(workers)
        time.sleep(0.5)
        conn = connect()
        try:
            due = time.time() + args.lead
            with conn.transaction():
                moved = conn.execute(
                    "UPDATE durable_runs SET due_at = %s WHERE status = 'sleeping'",
                    (due,),
                ).rowcount
                conn.execute(
                    "UPDATE durable_steps SET due_at = %s"
                    " WHERE step_id = 'wait' AND status = 'sleeping'",
                    (due,),
                )
            if moved != m:
                raise RuntimeError(f"{moved} sleeping runs, expected {m}")
            while time.time() < due:
                time.sleep(0.005)
            meter = CpuMeter([p.pid for p in workers])
            meter.start()
            waits: collections.Counter[str] = collections.Counter()
            lock_waits: collections.Counter[str] = collections.Counter()
            active_samples = 0
            samples = 0
            deadline = due + args.timeout
            done = 0
            next_sample = 0.0
            while True:
                now = time.time()
                if now >= next_sample:
                    next_sample = now + 0.1
                    samples += 1
                    for state, wtype, wevent, n in conn.execute(
                        "SELECT state, wait_event_type, wait_event, COUNT(*)"
                        " FROM pg_stat_activity WHERE datname = %s"
                        " AND pid <> pg_backend_pid()"
                        " AND state IN ('active', 'idle in transaction')"
                        " GROUP BY 1, 2, 3",
                        (PG_DATABASE,),
                    ):
                        active_samples += n
                        label = f"{state}: {wtype or 'CPU'}/{wevent or '-'}"
                        waits[label] += n
                    for locktype, classid, mode, n in conn.execute(
                        "SELECT l.locktype, l.classid::regclass::text, l.mode, COUNT(*)"
                        " FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid"
                        " WHERE NOT l.granted AND a.datname = %s GROUP BY 1, 2, 3",
                        (PG_DATABASE,),
                    ):
                        lock_waits[f"{locktype} {classid or ''} {mode}"] += n
                done = conn.execute(
                    "SELECT COUNT(*) FROM durable_runs WHERE status = 'completed'"
                ).fetchone()[0]
                if done >= m:
                    break
                if now > deadline:
                    break
                for p in workers:
                    if p.poll() is not None:
                        raise RuntimeError(
                            f"worker {p.pid} died:\n{tail(p.log_path)}"  # type: ignore[attr-defined]
                        )
                time.sleep(0.02)
            cpu = meter.stop()
            if done < m:
                log(
                    f"ABORTED: K={k}: only {done}/{m} runs completed"
                    f" {args.timeout:.0f} s after they became due"
                )
                return {"k": k, "aborted": True, "completed": done}
            fin = sorted(
                r[0]
                for r in conn.execute(
                    "SELECT finished_at FROM durable_runs WHERE status = 'completed'"
                )
            )
            reexec = conn.execute(
                "SELECT COUNT(*) FROM durable_steps WHERE step_id IN"
                " ('charge', 'notify') AND attempts > 1"
            ).fetchone()[0]
            per_pid: collections.Counter[int] = collections.Counter()
            for (output,) in conn.execute(
                "SELECT output FROM durable_steps WHERE step_id = 'charge'"
            ):
                try:
                    per_pid[int(json.loads(output)["pid"])] += 1
                except (ValueError, KeyError, TypeError):
                    per_pid[-1] += 1
        finally:
            conn.close()
    finally:
        for p in workers:
            children.stop(p)
    span = fin[-1] - due
    lo, hi = fin[int(0.1 * m)], fin[int(0.9 * m) - 1]
    resumed = m / span
    active = max(active_samples, 1)
    out = {
        "k": k,
        "runs": m,
        "threads_per_worker": args.threads,
        "create_s": round(took, 2),
        "first_done_after_due_s": round(fin[0] - due, 3),
        "all_done_after_due_s": round(span, 3),
        "resumed_per_s": round(resumed, 1),
        "steady_per_s": round(0.8 * m / (hi - lo), 1) if hi > lo else None,
        "cpu": cpu,
        "workers_cpu_ms_per_run": round(1000 * cpu["workers_cpu_s"] / m, 3),
        "postgres_cpu_ms_per_run": round(1000 * cpu["postgres_cpu_s"] / m, 3),
        "workers_cores": round(cpu["workers_cpu_s"] / cpu["wall_s"], 2),
        "postgres_cores": round(cpu["postgres_cpu_s"] / cpu["wall_s"], 2),
        "other_cores": round(cpu["other_cpu_s"] / cpu["wall_s"], 2),
        "machine_busy_share": round(
            cpu["machine_busy_s"] / cpu["machine_capacity_s"], 3
        )
        if cpu["machine_capacity_s"]
        else None,
        "pg_backends_sampled_avg": round(active_samples / max(samples, 1), 2),
        "pg_wait_events": [
            (label, round(n / active, 3)) for label, n in waits.most_common(8)
        ],
        "pg_lock_waits_per_sample": [
            (label, round(n / max(samples, 1), 2))
            for label, n in lock_waits.most_common(5)
        ],
        "steps_reexecuted": reexec,
        "runs_per_worker": sorted(per_pid.values(), reverse=True),
    }
    profiles = {}
    for files in diag.values():
        for kind, path in files.items():
            try:
                with open(path) as f:
                    profiles.setdefault(kind, []).append(json.load(f))
            except (OSError, ValueError):
                pass
    if profiles:
        out["profiles"] = profiles
    return out


def throughput(
    args: argparse.Namespace, children: Children, tmp: str
) -> dict[str, Any]:
    ks = args.ks
    rounds: list[dict[int, dict[str, Any]]] = []
    for r in range(args.rounds):
        order = ks[r % len(ks) :] + ks[: r % len(ks)]
        this: dict[int, dict[str, Any]] = {}
        for k in order:
            log(f"throughput round {r + 1}/{args.rounds}: K={k}, {args.runs} runs")
            res = throughput_round(k, args, children, tmp, f"{r}-{k}")
            this[k] = res
            if res.get("aborted"):
                return {"aborted": True, "rounds": rounds + [this]}
            log(
                f"  K={k}: {res['resumed_per_s']} runs/s"
                f" (steady {res['steady_per_s']}),"
                f" workers {res['workers_cores']} cores, postgres"
                f" {res['postgres_cores']} cores, other {res['other_cores']} cores"
            )
        rounds.append(this)
    summary: dict[int, dict[str, Any]] = {}

    def med(values: Any, digits: int = 2) -> float:
        return round(statistics.median(values), digits)

    for k in ks:
        rows = [rd[k] for rd in rounds]
        summary[k] = {
            "resumed_per_s": med(r["resumed_per_s"] for r in rows),
            "steady_per_s": med(r["steady_per_s"] or 0 for r in rows),
            "workers_cpu_ms_per_run": med(r["workers_cpu_ms_per_run"] for r in rows),
            "postgres_cpu_ms_per_run": med(r["postgres_cpu_ms_per_run"] for r in rows),
            "workers_cores": med(r["workers_cores"] for r in rows),
            "postgres_cores": med(r["postgres_cores"] for r in rows),
            "other_cores": med(r["other_cores"] for r in rows),
            "machine_busy_share": med(r["machine_busy_share"] or 0 for r in rows),
            "steps_reexecuted": sum(r["steps_reexecuted"] for r in rows),
        }
        row = summary[k]
        # What the 2 cores could give at this K's CPU cost per run (workers
        # plus PostgreSQL), if nothing else ran on the machine.
        per_run_ms = row["workers_cpu_ms_per_run"] + row["postgres_cpu_ms_per_run"]
        row["cpu_ceiling_per_s"] = round(1000 * (os.cpu_count() or 1) / per_run_ms, 1)
    ratios = {}
    base = ks[0]
    for k in ks[1:]:
        per_round = [
            rd[k]["resumed_per_s"] / rd[base]["resumed_per_s"] for rd in rounds
        ]
        steady = [
            (rd[k]["steady_per_s"] or 0) / (rd[base]["steady_per_s"] or 1)
            for rd in rounds
        ]
        ratios[f"{base}->{k}"] = {
            "median": round(statistics.median(per_round), 2),
            "per_round": [round(x, 2) for x in per_round],
            "steady_median": round(statistics.median(steady), 2),
        }
    return {
        "runs": args.runs,
        "threads_per_worker": args.threads,
        "rounds": [{str(k): v for k, v in rd.items()} for rd in rounds],
        "summary": {str(k): v for k, v in summary.items()},
        "ratios": ratios,
    }


# -- output --------------------------------------------------


def print_recovery(rec: dict[str, Any]) -> None:
    print(
        f"\nRecovery (SIGKILL -> run completed by the worker), PostgreSQL,"
        f" lease {rec['lease_s']} s, poll interval {rec['poll_interval_s']} s"
    )
    print(
        f"{'rep':>4} {'recovery s':>11} {'lease left':>11} {'expiry->done':>13}"
        f" {'expiry->step':>13}  client"
    )
    for i, r in enumerate(rec["repetitions"], 1):
        print(
            f"{i:>4} {r['recovery_s']:>11.3f} {r['lease_left_at_kill_s']:>11.3f}"
            f" {r['finish_after_expiry_s']:>13.3f}"
            f" {str(r['detect_after_expiry_s']):>13}"
            f"  {r['client']}"
        )
    print(
        f"min / median / max: {rec['recovery_min_s']:.3f} /"
        f" {rec['recovery_median_s']:.3f} / {rec['recovery_max_s']:.3f} s;"
        f" target lease + 1 s = {rec['target_s']:.1f} s"
        f" ({'met' if rec['target_met'] else 'MISSED'}); design bound"
        f" lease + poll + 1 s = {rec['design_bound_s']:.1f} s"
    )


def print_throughput(tp: dict[str, Any]) -> None:
    if tp.get("aborted"):
        print("\nthroughput: ABORTED")
        return
    print(
        f"\nThroughput: {tp['runs']} runs due at once, K worker processes x"
        f" {tp['threads_per_worker']} threads, PostgreSQL (median of"
        f" {len(tp['rounds'])} rounds)"
    )
    cols = [
        ("K", None),
        ("runs/s", "resumed_per_s"),
        ("steady/s", "steady_per_s"),
        ("wrk ms/run", "workers_cpu_ms_per_run"),
        ("pg ms/run", "postgres_cpu_ms_per_run"),
        ("wrk cores", "workers_cores"),
        ("pg cores", "postgres_cores"),
        ("other", "other_cores"),
        ("busy", "machine_busy_share"),
        ("ceiling/s", "cpu_ceiling_per_s"),
        ("re-exec", "steps_reexecuted"),
    ]
    print("".join(f"{c:>11}" for c, _ in cols))
    for k, row in tp["summary"].items():
        cells = [k] + [row[key] for _, key in cols[1:]]
        print("".join(f"{str(c):>11}" for c in cells))
    first = next(iter(tp["summary"].values()))
    print(
        "ceiling/s = cores / (worker + PostgreSQL CPU per run): the rate the"
        " machine could reach at that K's cost with nothing else running;"
        f" at K=1's cost the 1->K ratio could be at most"
        f" {first['cpu_ceiling_per_s'] / first['resumed_per_s']:.2f}x"
    )
    for name, r in tp["ratios"].items():
        met = r["median"] >= SCALING_TARGET if name.endswith("->2") else None
        verdict = (
            ""
            if met is None
            else f" (target >= {SCALING_TARGET}x: {'met' if met else 'MISSED'})"
        )
        print(
            f"scaling {name}: {r['median']}x (per round {r['per_round']};"
            f" steady {r['steady_median']}x){verdict}"
        )
    print("pg_stat_activity of our database (share of sampled busy backends):")
    for rd in tp["rounds"][-1:]:
        for k, res in rd.items():
            waits = ", ".join(
                f"{label} {share:.0%}" for label, share in res["pg_wait_events"][:4]
            )
            locks = ", ".join(
                f"{label} {n}" for label, n in res.get("pg_lock_waits_per_sample", [])
            )
            print(
                f"  K={k}: avg {res['pg_backends_sampled_avg']} busy backends; {waits};"
                f" runs per worker {res['runs_per_worker']}"
            )
            if locks:
                print(f"        lock waits per sample: {locks}")
    for rd in tp["rounds"][-1:]:
        for k, res in rd.items():
            for prof in res.get("profiles", {}).get("samples", [])[:1]:
                print(f"  K={k} worker stack samples (idle {prof['idle_share']:.0%}):")
                for name, share in prof["by_flask_durable_stack"][:8]:
                    print(f"    {share:6.1%}  {name}")
            for prof in res.get("profiles", {}).get("cprofile", [])[:1]:
                print(f"  K={k} worker CPU by package:")
                for name, share in prof.get("own_time_by_package", [])[:10]:
                    print(f"    {share:6.1%}  {name}")
                print(f"  K={k} flask_durable by cumulative CPU:")
                for name, calls, share in prof.get(
                    "flask_durable_by_cumulative_time", []
                )[:14]:
                    print(f"    {share:6.1%} {calls:>8}  {name}")


def loadavg() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", choices=["recovery", "throughput"])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--reps", type=int, default=5, help="recovery repetitions")
    parser.add_argument("--lease", type=float, default=5.0)
    parser.add_argument("--poll", type=float, default=0.5)
    parser.add_argument("--runs", type=int, default=2000, help="throughput runs")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument(
        "--workers", default="1,2,4", help="K values (worker processes)"
    )
    parser.add_argument(
        "--threads", type=int, default=8, help="DURABLE_WORKERS per worker process"
    )
    parser.add_argument(
        "--lead",
        type=float,
        default=3.0,
        help="seconds from the move to the due instant",
    )
    parser.add_argument("--timeout", type=float, default=300.0)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--cprofile", action="store_true")
    parser.add_argument("--output", default=None)
    parser.add_argument("--keep-db", action="store_true")
    args = parser.parse_args()
    args.ks = [int(x) for x in args.workers.split(",")]
    if args.quick:
        args.reps, args.runs, args.rounds = 2, 500, 1
    output = args.output
    if output is None and not args.quick:
        output = os.path.join(RESULTS, "scaleout.json")

    children = Children()

    def on_signal(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_signal)
    os.makedirs(RESULTS, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix="scaleout-", suffix=".tmp", dir=RESULTS)
    result: dict[str, Any] = {
        "scenario": "scaleout",
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "python": platform.python_version(),
        "cores": os.cpu_count(),
        "loadavg_before": loadavg(),
    }
    log(f"load average before: {result['loadavg_before']} ({os.cpu_count()} cores)")
    failed = False
    try:
        if args.only in (None, "recovery"):
            result["recovery"] = recovery(args, children, tmp)
            print_recovery(result["recovery"])
        if args.only in (None, "throughput"):
            result["throughput"] = throughput(args, children, tmp)
            print_throughput(result["throughput"])
            failed = bool(result["throughput"].get("aborted"))
    except Exception as e:
        failed = True
        result["error"] = f"{type(e).__name__}: {e}"
        log(f"FAILED: {result['error']}")
        for path in sorted(glob.glob(os.path.join(tmp, "*.log")))[-3:]:
            print(f"--- {os.path.basename(path)}\n{tail(path)}")
    finally:
        children.kill_all()
        shutil.rmtree(tmp, ignore_errors=True)
        if not args.keep_db:
            try:
                pg_admin(f"DROP DATABASE IF EXISTS {PG_DATABASE} WITH (FORCE)")
            except Exception as e:
                log(f"could not drop {PG_DATABASE}: {e}")
    result["loadavg_after"] = loadavg()
    log(f"load average after: {result['loadavg_after']}")
    if output and not failed:
        with open(output, "w") as f:
            json.dump(result, f, indent=2)
            f.write("\n")
        log(f"wrote {os.path.relpath(output, ROOT)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
