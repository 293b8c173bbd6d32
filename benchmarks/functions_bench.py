"""Durable functions end to end: events/s that start a 3-step function, with
1 and 2 worker processes on PostgreSQL, beside the same work as a DBOS
Transact queue of workflows.

Scenario (issue 17). **flask-durable**: the app of
``benchmarks/functions_app.py`` registers ``@durable.function("bench-3-steps",
event="bench/order")``, a function of 3 ``step.run`` (:func:`prepare`,
:func:`charge`, :func:`notify`); K ``flask --app functions_app:create_app
durable worker`` processes (``DURABLE_WORKERS`` threads each) execute its
runs. This process builds the same app with the scheduler off and posts the
N events to the bearer-key events route ``POST /durable/events`` (Flask test
client) in batches of ``--batch`` (each batch: one request, one transaction
inserting its runs). **DBOS**: K DBOS worker processes (this file run by
``benchmarks/.venv-dbos``'s Python with ``--dbos-worker``) launch DBOS with
a ``@DBOS.workflow`` calling the same 3 functions as ``@DBOS.step``, and
listen to one queue registered with ``worker_concurrency`` = the same thread
count (each process with its own ``executor_id``; the queue is polled every
``--dbos-poll`` = 0.05 s, since DBOS's default 1 s poll caps a process at
``worker_concurrency`` workflows a second); a ``DBOSClient`` process
(``--dbos-enqueue``) enqueues the N workflows in batches of ``--batch``
(``enqueue_in_transaction``: one transaction per batch).

Each measurement starts on a fresh database with its K workers ready, after
an uncounted warm-up of ``4 x threads x K`` events (every worker connected
and its code paths warm). Measured: from just before the first send to the
last run finished (flask-durable's ``finished_at``, DBOS's ``completed_at``),
polled with ``COUNT(*)`` of completed runs on a separate connection;
events/s = N / that time. Also: the time the sending took, per-run latency
(created -> finished) percentiles, CPU per event of the workers, of
PostgreSQL and of the sender (``/proc``), what else used the machine, how
the runs spread over the workers, and steps executed twice.

Same durability on both sides, each system's default: flask-durable's
``DURABLE_CHECKPOINT="sync"`` (each step committed before ``step.run``
returns) and DBOS's step checkpoints, both with the server's
``synchronous_commit`` (read back and printed).

Usage::

    .venv/bin/python benchmarks/functions_bench.py            # ~3-4 minutes
    .venv/bin/python benchmarks/functions_bench.py --quick    # smoke run
    .venv/bin/python benchmarks/functions_bench.py --only flask-durable --cprofile

Writes ``benchmarks/results/functions.json`` (``--quick`` writes nothing
unless ``--output`` is given). Needs PostgreSQL (databases
``durable_bench_functions`` and ``dbos_bench_functions``, dropped and
recreated for each measurement, dropped at the end). Every child process
is killed at exit.

This module's top level imports only the standard library: the DBOS venv
runs it too. The 3 steps both sides run are in ``functions_work.py``.
"""

from __future__ import annotations

import argparse
import atexit
import collections
import json
import os
import platform
import shutil
import signal
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

from functions_work import EVENT_KEY, EVENT_NAME, FUNCTION_ID, charge, notify, prepare  # noqa: E402

DBOS_QUEUE = "bench_orders"
DBOS_WORKFLOW = "bench_three_steps"
DBOS_VERSION_TAG = "bench"

PG_ADMIN = os.environ.get("BENCH_PG_ADMIN_DSN", "postgresql://postgres@127.0.0.1:5432")
FD_DATABASE = "durable_bench_functions"
DBOS_DATABASE = "dbos_bench_functions"


# -- DBOS side (run by benchmarks/.venv-dbos's Python) ----------------------------


def _emit(data: dict[str, Any]) -> None:
    print(json.dumps(data), flush=True)


def dbos_worker(url: str, concurrency: int, poll: float, executor_id: str) -> None:
    """Launch DBOS, register the workflow and the queue, say ``ready`` on
    stdout, execute queued workflows until SIGTERM."""
    import importlib.metadata
    import logging

    import sqlalchemy as sa
    from dbos import DBOS

    logging.disable(logging.WARNING)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())

    @DBOS.step()
    def step_prepare(n: int) -> dict[str, Any]:
        return prepare(n)

    @DBOS.step()
    def step_charge(order: dict[str, Any]) -> dict[str, Any]:
        return charge(order)

    @DBOS.step()
    def step_notify(order: dict[str, Any], receipt: dict[str, Any]) -> dict[str, Any]:
        return notify(order, receipt)

    @DBOS.workflow(name=DBOS_WORKFLOW)
    def three_steps(n: int) -> dict[str, Any]:
        order = step_prepare(n)
        receipt = step_charge(order)
        sent = step_notify(order, receipt)
        return {"order": order["order"], "ref": sent["ref"]}

    config: Any = {
        "name": "functions-bench",
        "system_database_url": url,
        "log_level": "ERROR",
        "executor_id": executor_id,
        "application_version": DBOS_VERSION_TAG,
    }
    dbos = DBOS(config=config)
    DBOS.launch()
    DBOS.register_queue(
        DBOS_QUEUE,
        worker_concurrency=concurrency or None,
        polling_interval_sec=poll,
        on_conflict="always_update",
    )
    # The queue manager starts a queue's thread within a second of it being
    # registered: ready once it has.
    deadline = time.time() + 30
    thread = f"queue-worker-{DBOS_QUEUE}"
    while not any(t.name == thread for t in threading.enumerate()):
        if time.time() > deadline:
            raise RuntimeError("DBOS did not start the queue's thread")
        time.sleep(0.05)
    settings: dict[str, Any] = {}
    try:
        with dbos._sys_db.engine.connect() as conn:
            for name in ("synchronous_commit", "fsync"):
                settings[name] = conn.execute(sa.text(f"SHOW {name}")).scalar()
    except Exception as e:
        settings["note"] = f"could not read settings: {e}"
    _emit(
        {
            "ready": True,
            "pid": os.getpid(),
            "version": importlib.metadata.version("dbos"),
            "settings": settings,
        }
    )
    while not stop.wait(0.2):
        pass
    DBOS.destroy(workflow_completion_timeout_sec=0)


def dbos_enqueue(url: str) -> None:
    """A ``DBOSClient`` that answers ``send PREFIX N BATCH`` on stdin by
    enqueuing N workflows, BATCH per transaction, and reports the times."""
    import sqlalchemy as sa
    from dbos import DBOSClient

    client = DBOSClient(system_database_url=url)
    engine = sa.create_engine(
        "postgresql+psycopg://" + url.split("://", 1)[1], pool_size=1
    )
    with engine.connect() as conn:
        conn.execute(sa.text("SELECT 1"))
    _emit({"ready": True, "pid": os.getpid()})
    for line in sys.stdin:
        parts = line.split()
        if not parts:
            continue
        if parts[0] == "quit":
            break
        prefix, n, batch = parts[1], int(parts[2]), int(parts[3])
        t0 = time.time()
        for start in range(0, n, batch):
            with engine.begin() as conn:
                for i in range(start, min(start + batch, n)):
                    client.enqueue_in_transaction(
                        conn,
                        {
                            "queue_name": DBOS_QUEUE,
                            "workflow_name": DBOS_WORKFLOW,
                            "workflow_id": f"{prefix}-{i}",
                            "app_version": DBOS_VERSION_TAG,
                        },
                        i,
                    )
        _emit({"t0": t0, "t_sent": time.time()})
    client.destroy()
    engine.dispose()


# -- processes (project venv) -------------------------------------------------


def log(message: str) -> None:
    print(f"[functions {time.strftime('%H:%M:%S')}] {message}", flush=True)


class Children:
    """Every child process we start; all are killed at exit, even on error."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []
        atexit.register(self.kill_all)

    def start(
        self,
        argv: list[str],
        env: dict[str, str],
        log_path: str,
        stdin: bool = False,
    ) -> subprocess.Popen[bytes]:
        out = open(log_path, "ab")  # noqa: SIM115 (closed with the process)
        try:
            proc = subprocess.Popen(
                argv,
                cwd=HERE,
                env=env,
                stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        finally:
            out.close()
        proc.log_path = log_path  # type: ignore[attr-defined]
        self.procs.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen[bytes], timeout: float = 20.0) -> None:
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
        if proc.stdin is not None:
            try:
                proc.stdin.close()
            except OSError:
                pass
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


def tail(path: str, lines: int = 15) -> str:
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-lines:])
    except OSError:
        return ""


class LogReader:
    """The JSON lines a child writes to its log, read as they come."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        self.proc = proc
        self.path: str = proc.log_path  # type: ignore[attr-defined]
        self.offset = 0

    def next_json(self, key: str, timeout: float = 60.0) -> dict[str, Any]:
        deadline = time.time() + timeout
        while True:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read()
            end = data.rfind(b"\n")
            if end >= 0:
                chunk, self.offset = data[: end + 1], self.offset + end + 1
                for line in chunk.decode(errors="replace").splitlines():
                    line = line.strip()
                    if line.startswith("{"):
                        try:
                            item: dict[str, Any] = json.loads(line)
                        except ValueError:
                            continue
                        if key in item:
                            return item
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"process {self.proc.pid} exited ({self.proc.returncode}):\n"
                    + tail(self.path)
                )
            if time.time() > deadline:
                raise RuntimeError(f"no {key!r} from {self.proc.pid} in {timeout} s")
            time.sleep(0.02)


def wait_banner(procs: list[subprocess.Popen[bytes]], timeout: float = 60.0) -> None:
    """Until every flask-durable worker printed its banner (its scheduler
    and listener run)."""
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


def pg_admin(sql: str) -> None:
    import psycopg

    with psycopg.connect(f"{PG_ADMIN}/postgres", autocommit=True) as conn:
        conn.execute(sql)


def reset_db(name: str) -> str:
    pg_admin(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
    pg_admin(f"CREATE DATABASE {name}")
    return f"{PG_ADMIN}/{name}"


def wait_for_server(timeout: float = 120.0) -> None:
    """Until PostgreSQL accepts connections again."""
    deadline = time.time() + timeout
    while True:
        try:
            pg_admin("SELECT 1")
            return
        except Exception:
            if time.time() > deadline:
                raise
            time.sleep(1.0)


def connect(name: str) -> Any:
    import psycopg

    return psycopg.connect(f"{PG_ADMIN}/{name}", autocommit=True)


def fd_env(**extra: Any) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([HERE, ROOT, env.get("PYTHONPATH", "")])
    env["BENCH_DB_URL"] = "postgresql+psycopg://" + PG_ADMIN.split("://", 1)[1]
    env["BENCH_DB_URL"] += f"/{FD_DATABASE}"
    env.pop("FLASK_APP", None)
    env.update({k: str(v) for k, v in extra.items()})
    return env


def dbos_env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    return env


# -- CPU accounting -----------------------------------------------------------

CLK_TCK = os.sysconf("SC_CLK_TCK")


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
    return (sum(parts[:8]) - idle) / CLK_TCK, sum(parts[:8]) / CLK_TCK


def postgres_pids() -> list[int]:
    pids = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/comm") as f:
                    if f.read().startswith("postgres"):
                        pids.append(int(name))
            except OSError:
                pass
    return pids


class CpuMeter:
    """CPU seconds used between ``start()`` and ``stop()`` by the workers,
    the sender, all PostgreSQL processes, and the whole machine."""

    def __init__(self, workers: list[int], sender: int) -> None:
        self.workers = workers
        self.sender = sender

    def _snap(self) -> dict[str, Any]:
        return {
            "t": time.time(),
            "workers": {pid: proc_cpu(pid) for pid in self.workers},
            "pg": {pid: proc_cpu(pid) for pid in postgres_pids()},
            "sender": proc_cpu(self.sender),
            "self": proc_cpu(os.getpid()),
            "machine": machine_cpu(),
        }

    def start(self) -> None:
        self.a = self._snap()

    def stop(self) -> dict[str, float]:
        a, b = self.a, self._snap()

        def delta(x: dict[int, float | None], y: dict[int, float | None]) -> float:
            # Backends started meanwhile count from 0.
            return sum(v - (x.get(pid) or 0.0) for pid, v in y.items() if v is not None)

        workers = delta(a["workers"], b["workers"])
        pg = delta(a["pg"], b["pg"])
        sender = (b["sender"] or 0.0) - (a["sender"] or 0.0)
        me = 0.0 if self.sender == os.getpid() else (b["self"] or 0) - (a["self"] or 0)
        busy = b["machine"][0] - a["machine"][0]
        return {
            "wall_s": round(b["t"] - a["t"], 3),
            "workers_cpu_s": round(workers, 2),
            "postgres_cpu_s": round(pg, 2),
            "sender_cpu_s": round(sender, 2),
            "machine_busy_s": round(busy, 2),
            "machine_capacity_s": round(b["machine"][1] - a["machine"][1], 2),
            "other_cpu_s": round(max(busy - workers - pg - sender - me, 0.0), 2),
        }


# -- measurements -------------------------------------------------------------


def wait_count(
    conn: Any, sql: str, target: int, timeout: float, procs: list[Any]
) -> float:
    """Poll ``sql`` (a count) every 20 ms until it reaches ``target``;
    returns the time it was seen."""
    deadline = time.time() + timeout
    while True:
        done = conn.execute(sql).fetchone()[0]
        if done >= target:
            return time.time()
        if time.time() > deadline:
            raise RuntimeError(f"only {done} of {target} finished after {timeout} s")
        for p in procs:
            if p.poll() is not None:
                raise RuntimeError(f"process {p.pid} died:\n{tail(p.log_path)}")
        time.sleep(0.02)


def percentiles(values: list[float]) -> dict[str, float]:
    values = sorted(values)
    if not values:
        return {}

    def at(q: float) -> float:
        return values[min(len(values) - 1, int(q * len(values)))]

    return {
        "p50": round(at(0.5), 3),
        "p90": round(at(0.9), 3),
        "p99": round(at(0.99), 3),
        "max": round(values[-1], 3),
    }


def summarize(
    system: str,
    k: int,
    args: argparse.Namespace,
    t0: float,
    t_sent: float,
    t_seen: float,
    rows: list[tuple[float, float]],
    cpu: dict[str, float],
    per_worker: list[int],
    reexecuted: int,
) -> dict[str, Any]:
    n = args.events
    if len(rows) != n:
        raise RuntimeError(f"{system} K={k}: {len(rows)} measured runs, expected {n}")
    t_end = max(finished for _, finished in rows)
    span = t_end - t0
    per_ms = 1000.0 / n
    return {
        "system": system,
        "k": k,
        "events": n,
        "batch": args.batch,
        "threads_per_worker": args.threads,
        "send_s": round(t_sent - t0, 3),
        "total_s": round(span, 3),
        # Runs still finishing after the last send returned: ~0 when the
        # sender, not the workers, sets the pace.
        "tail_s": round(span - (t_sent - t0), 3),
        "seen_after_last_s": round(t_seen - t_end, 3),
        "events_per_s": round(n / span, 1),
        "latency_s": percentiles([f - c for c, f in rows]),
        "cpu": cpu,
        "workers_cpu_ms_per_event": round(cpu["workers_cpu_s"] * per_ms, 3),
        "postgres_cpu_ms_per_event": round(cpu["postgres_cpu_s"] * per_ms, 3),
        "sender_cpu_ms_per_event": round(cpu["sender_cpu_s"] * per_ms, 3),
        "workers_cores": round(cpu["workers_cpu_s"] / cpu["wall_s"], 2),
        "postgres_cores": round(cpu["postgres_cpu_s"] / cpu["wall_s"], 2),
        "other_cores": round(cpu["other_cpu_s"] / cpu["wall_s"], 2),
        "machine_busy_share": round(
            cpu["machine_busy_s"] / max(cpu["machine_capacity_s"], 1e-9), 3
        ),
        # What the cores could give at this cost per event (workers,
        # PostgreSQL and sender) if nothing else ran on the machine.
        "cpu_ceiling_per_s": round(
            (os.cpu_count() or 1)
            * n
            / max(
                sum(cpu[f"{who}_cpu_s"] for who in ("workers", "postgres", "sender")),
                1e-9,
            ),
            1,
        ),
        "runs_per_worker": per_worker,
        "steps_reexecuted": reexecuted,
    }


def measure_fd(
    k: int, args: argparse.Namespace, children: Children, tmp: str, tag: str
) -> dict[str, Any]:
    reset_db(FD_DATABASE)
    env = fd_env(BENCH_SCHEDULER=0, BENCH_POLL=args.poll)
    os.environ.update({k: v for k, v in env.items() if k.startswith("BENCH_")})
    os.environ.pop("BENCH_CPROFILE_OUT", None)
    if HERE not in sys.path:
        sys.path.insert(0, HERE)
    import functions_app

    app = functions_app.create_app()
    client = app.test_client()
    headers = {"Authorization": f"Bearer {EVENT_KEY}"}
    lifecycle = app.extensions["durable"]
    with app.app_context():
        lifecycle.ensure_schema()
    workers: list[subprocess.Popen[bytes]] = []
    profiles: list[str] = []
    conn = connect(FD_DATABASE)
    try:
        for i in range(k):
            extra: dict[str, Any] = {
                "BENCH_WORKERS": args.threads,
                "BENCH_POLL": args.poll,
            }
            if args.cprofile:
                profiles.append(os.path.join(tmp, f"cprofile-{tag}-{i}.json"))
                extra["BENCH_CPROFILE_OUT"] = profiles[-1]
            workers.append(
                children.start(
                    [
                        sys.executable,
                        "-m",
                        "flask",
                        "--app",
                        "functions_app:create_app",
                        "durable",
                        "worker",
                    ],
                    fd_env(**extra),
                    os.path.join(tmp, f"fd-worker-{tag}-{i}.log"),
                )
            )
        wait_banner(workers)

        def send(prefix: str, n: int) -> None:
            for start in range(0, n, args.batch):
                batch = [
                    {"name": EVENT_NAME, "data": {"n": i}, "id": f"{prefix}-{i}"}
                    for i in range(start, min(start + args.batch, n))
                ]
                rv = client.post("/durable/events", json=batch, headers=headers)
                if rv.status_code != 202:
                    raise RuntimeError(
                        f"events route answered {rv.status_code}:"
                        f" {rv.get_data()[:300]!r}"
                    )
                rv.close()

        done_sql = (
            "SELECT COUNT(*) FROM durable_runs"
            f" WHERE endpoint = '{FUNCTION_ID}' AND status = 'completed'"
        )
        warm = args.warmup * k
        send("warm", warm)
        wait_count(conn, done_sql, warm, args.timeout, workers)
        meter = CpuMeter([p.pid for p in workers], os.getpid())
        meter.start()
        t0 = time.time()
        send("bench", args.events)
        t_sent = time.time()
        t_seen = wait_count(conn, done_sql, warm + args.events, args.timeout, workers)
        cpu = meter.stop()
        rows = conn.execute(
            "SELECT created_at, finished_at FROM durable_runs"
            " WHERE endpoint = %s AND created_at >= %s",
            (FUNCTION_ID, t0),
        ).fetchall()
        per_pid: collections.Counter[int] = collections.Counter()
        for (output,) in conn.execute(
            "SELECT s.output FROM durable_steps s JOIN durable_runs r"
            " ON r.id = s.run_id WHERE s.step_id = 'charge' AND r.created_at >= %s",
            (t0,),
        ):
            per_pid[int(json.loads(output)["pid"])] += 1
        reexec = conn.execute(
            "SELECT COUNT(*) FROM durable_steps WHERE attempts > 1"
        ).fetchone()[0]
    finally:
        conn.close()
        for p in workers:
            children.stop(p)
        with app.app_context():
            lifecycle.close()
    out = summarize(
        "flask-durable",
        k,
        args,
        t0,
        t_sent,
        t_seen,
        [(float(c), float(f)) for c, f in rows],
        cpu,
        sorted(per_pid.values(), reverse=True),
        reexec,
    )
    out["settings"] = {"checkpoint": lifecycle.config.checkpoint, **pg_settings()}
    for path in profiles:
        try:
            with open(path) as f:
                out.setdefault("cprofile", []).append(json.load(f))
        except (OSError, ValueError):
            pass
    return out


def pg_settings() -> dict[str, str]:
    with connect("postgres") as conn:
        return {
            name: conn.execute(f"SHOW {name}").fetchone()[0]
            for name in ("synchronous_commit", "fsync")
        }


def measure_dbos(
    k: int, args: argparse.Namespace, children: Children, tmp: str, tag: str
) -> dict[str, Any]:
    from dbos_bench import ensure_venv

    python = ensure_venv()
    url = reset_db(DBOS_DATABASE)
    workers: list[subprocess.Popen[bytes]] = []
    infos = []
    enqueuer = None
    conn = None
    try:
        # One after the other: the first one creates DBOS's schema.
        for i in range(k):
            proc = children.start(
                [
                    python,
                    os.path.abspath(__file__),
                    "--dbos-worker",
                    url,
                    str(args.dbos_concurrency),
                    str(args.dbos_poll),
                    f"bench-worker-{i}",
                ],
                dbos_env(),
                os.path.join(tmp, f"dbos-worker-{tag}-{i}.log"),
            )
            workers.append(proc)
            infos.append(LogReader(proc).next_json("ready", 90))
        enqueuer = children.start(
            [python, os.path.abspath(__file__), "--dbos-enqueue", url],
            dbos_env(),
            os.path.join(tmp, f"dbos-enqueue-{tag}.log"),
            stdin=True,
        )
        reader = LogReader(enqueuer)
        reader.next_json("ready", 60)
        conn = connect(DBOS_DATABASE)

        def send(prefix: str, n: int) -> dict[str, Any]:
            assert enqueuer is not None and enqueuer.stdin is not None
            enqueuer.stdin.write(f"send {prefix} {n} {args.batch}\n".encode())
            enqueuer.stdin.flush()
            return reader.next_json("t_sent", args.timeout)

        done_sql = (
            "SELECT COUNT(*) FROM dbos.workflow_status"
            f" WHERE name = '{DBOS_WORKFLOW}' AND status = 'SUCCESS'"
        )
        warm = args.warmup * k
        send("warm", warm)
        wait_count(conn, done_sql, warm, args.timeout, workers)
        meter = CpuMeter([p.pid for p in workers], enqueuer.pid)
        meter.start()
        times = send("bench", args.events)
        t_seen = wait_count(
            conn, done_sql, warm + args.events, args.timeout, workers + [enqueuer]
        )
        cpu = meter.stop()
        rows = conn.execute(
            "SELECT created_at / 1000.0, completed_at / 1000.0, executor_id"
            " FROM dbos.workflow_status WHERE workflow_uuid LIKE 'bench-%%'"
        ).fetchall()
        reexec = conn.execute(
            "SELECT COUNT(*) FROM dbos.workflow_status WHERE recovery_attempts > 1"
        ).fetchone()[0]
    finally:
        if conn is not None:
            conn.close()
        if enqueuer is not None:
            children.stop(enqueuer)
        for p in workers:
            children.stop(p)
    per_executor = collections.Counter(r[2] for r in rows)
    out = summarize(
        "DBOS",
        k,
        args,
        float(times["t0"]),
        float(times["t_sent"]),
        t_seen,
        [(float(c), float(f)) for c, f, _ in rows],
        cpu,
        sorted(per_executor.values(), reverse=True),
        reexec,
    )
    out["version"] = infos[0].get("version")
    out["settings"] = {
        "worker_concurrency": args.dbos_concurrency or None,
        "polling_interval_sec": args.dbos_poll,
        **infos[0].get("settings", {}),
    }
    return out


# -- output -------------------------------------------------------------------


def median_rows(rounds: list[dict[str, dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Per (system, K): the medians over rounds of the figures in the table."""
    keys = [
        "send_s",
        "total_s",
        "tail_s",
        "events_per_s",
        "workers_cpu_ms_per_event",
        "postgres_cpu_ms_per_event",
        "sender_cpu_ms_per_event",
        "workers_cores",
        "postgres_cores",
        "other_cores",
        "machine_busy_share",
        "cpu_ceiling_per_s",
    ]
    out: dict[str, dict[str, Any]] = {}
    for name in rounds[0]:
        rows = [rd[name] for rd in rounds if name in rd]
        med = {key: round(statistics.median(r[key] for r in rows), 3) for key in keys}
        for q in ("p50", "p99"):
            med[f"latency_{q}_s"] = round(
                statistics.median(r["latency_s"][q] for r in rows), 3
            )
        med["runs_per_worker"] = rows[-1]["runs_per_worker"]
        med["steps_reexecuted"] = sum(r["steps_reexecuted"] for r in rows)
        med["system"], med["k"] = rows[0]["system"], rows[0]["k"]
        out[name] = med
    return out


def ratios(
    rounds: list[dict[str, dict[str, Any]]], ks: list[int], systems: list[str]
) -> dict[str, Any]:
    """Median of per-round ratios: flask-durable / DBOS at each K, and each
    system's 1 -> K scaling."""
    found: dict[str, Any] = {}

    def med(pairs: list[tuple[str, str]]) -> dict[str, Any] | None:
        per_round = [
            rd[a]["events_per_s"] / rd[b]["events_per_s"]
            for rd in rounds
            for x, y in pairs
            if (a := x) in rd and (b := y) in rd
        ]
        if not per_round:
            return None
        return {
            "median": round(statistics.median(per_round), 2),
            "per_round": [round(x, 2) for x in per_round],
        }

    if len(systems) == 2:
        for k in ks:
            r = med([(f"flask-durable K={k}", f"DBOS K={k}")])
            if r:
                found[f"flask-durable/DBOS K={k}"] = r
    base = ks[0]
    for system in systems:
        for k in ks[1:]:
            r = med([(f"{system} K={k}", f"{system} K={base}")])
            if r:
                found[f"{system} {base}->{k}"] = r
    return found


def print_table(result: dict[str, Any]) -> None:
    summary = result["summary"]
    print(
        f"\nDurable functions end to end: {result['events']} events, batches of"
        f" {result['batch']}, K worker processes x {result['threads']} threads,"
        f" PostgreSQL (median of {len(result['rounds'])} round(s))"
    )
    cols = [
        ("system", "system", 14),
        ("K", "k", 3),
        ("events/s", "events_per_s", 10),
        ("total s", "total_s", 9),
        ("send s", "send_s", 8),
        ("tail s", "tail_s", 8),
        ("p50 s", "latency_p50_s", 8),
        ("p99 s", "latency_p99_s", 8),
        ("wrk ms/ev", "workers_cpu_ms_per_event", 10),
        ("pg ms/ev", "postgres_cpu_ms_per_event", 9),
        ("snd ms/ev", "sender_cpu_ms_per_event", 10),
        ("wrk cores", "workers_cores", 10),
        ("pg cores", "postgres_cores", 9),
        ("other", "other_cores", 6),
        ("busy", "machine_busy_share", 6),
        ("ceiling/s", "cpu_ceiling_per_s", 10),
        ("re-exec", "steps_reexecuted", 8),
    ]
    print("".join(f"{title:>{w}}" for title, _, w in cols) + "  runs per worker")
    for row in summary.values():
        cells = "".join(f"{str(row[key]):>{w}}" for _, key, w in cols)
        print(f"{cells}  {row['runs_per_worker']}")
    for name, r in result["ratios"].items():
        print(f"{name}: {r['median']}x (per round {r['per_round']})")
    for name, s in result["settings"].items():
        print(f"{name}: {s}")


def print_profiles(result: dict[str, Any]) -> None:
    for rd in result["rounds"][-1:]:
        for name, res in rd.items():
            for prof in res.get("cprofile", [])[:1]:
                print(f"  {name} worker CPU by package:")
                for pkg, share in prof.get("own_time_by_package", [])[:10]:
                    print(f"    {share:6.1%}  {pkg}")
                print(f"  {name} flask_durable by cumulative CPU:")
                for fn, calls, share in prof.get(
                    "flask_durable_by_cumulative_time", []
                )[:16]:
                    print(f"    {share:6.1%} {calls:>8}  {fn}")


def loadavg() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="300 events, smoke run")
    parser.add_argument("--events", type=int, default=2000)
    parser.add_argument("--batch", type=int, default=100, help="events per send")
    parser.add_argument("--workers", default="1,2", help="K values (processes)")
    parser.add_argument("--threads", type=int, default=8, help="threads per worker")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument(
        "--only", choices=["flask-durable", "dbos"], help="one system only"
    )
    parser.add_argument(
        "--poll", type=float, default=1.0, help="DURABLE_POLL_INTERVAL (default 1)"
    )
    parser.add_argument(
        "--dbos-concurrency",
        type=int,
        default=None,
        help="the DBOS queue's worker_concurrency (default: --threads; 0: none)",
    )
    parser.add_argument(
        "--dbos-poll",
        type=float,
        default=0.05,
        help="the DBOS queue's polling_interval_sec (default 0.05; DBOS's own"
        " default of 1 s caps a process at worker_concurrency workflows/s)",
    )
    parser.add_argument(
        "--warmup", type=int, default=None, help="warm-up events per worker"
    )
    parser.add_argument("--timeout", type=float, default=240.0)
    parser.add_argument("--cprofile", action="store_true")
    parser.add_argument("--output", default=None)
    parser.add_argument("--keep-logs", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.events, args.rounds = 300, 1
    if args.dbos_concurrency is None:
        args.dbos_concurrency = args.threads
    if args.warmup is None:
        args.warmup = 4 * args.threads
    args.batch = max(1, min(args.batch, 1000))
    ks = [int(x) for x in args.workers.split(",")]
    systems = {None: ["flask-durable", "DBOS"], "dbos": ["DBOS"]}.get(
        args.only, ["flask-durable"]
    )
    output = args.output
    if output is None and not args.quick:
        output = os.path.join(RESULTS, "functions.json")

    children = Children()
    signal.signal(signal.SIGTERM, lambda signum, _: sys.exit(128 + signum))
    os.makedirs(RESULTS, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix="functions-", suffix=".tmp", dir=RESULTS)
    result: dict[str, Any] = {
        "scenario": "functions",
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "python": platform.python_version(),
        "cores": os.cpu_count(),
        "events": args.events,
        "batch": args.batch,
        "threads": args.threads,
        "warmup_per_worker": args.warmup,
        "loadavg_before": loadavg(),
    }
    log(f"load average before: {result['loadavg_before']} ({os.cpu_count()} cores)")
    measure = {"flask-durable": measure_fd, "DBOS": measure_dbos}
    rounds: list[dict[str, dict[str, Any]]] = []
    failed = False
    started = time.time()
    try:
        for r in range(args.rounds):
            this: dict[str, dict[str, Any]] = {}
            for k in ks:
                order = systems if (r + k) % 2 == 0 else systems[::-1]
                for system in order:
                    name = f"{system} K={k}"
                    log(f"round {r + 1}/{args.rounds}: {name}, {args.events} events")
                    try:
                        res = measure[system](k, args, children, tmp, f"{r}-{k}")
                    except Exception as e:
                        # For example the server restarted under us: once more.
                        log(f"  {name} failed ({type(e).__name__}: {e}); retrying")
                        wait_for_server()
                        res = measure[system](k, args, children, tmp, f"{r}-{k}-b")
                        res["retried"] = f"{type(e).__name__}: {e}"[:300]
                    this[name] = res
                    log(
                        f"  {name}: {res['events_per_s']} events/s (send"
                        f" {res['send_s']} s, total {res['total_s']} s), workers"
                        f" {res['workers_cores']} cores, postgres"
                        f" {res['postgres_cores']} cores, other"
                        f" {res['other_cores']} cores; per worker"
                        f" {res['runs_per_worker']}"
                    )
            rounds.append(this)
        result["rounds"] = rounds
        result["summary"] = median_rows(rounds)
        result["ratios"] = ratios(rounds, ks, systems)
        result["settings"] = {
            system: rounds[0][f"{system} K={ks[0]}"]["settings"]
            | (
                {"version": rounds[0][f"{system} K={ks[0]}"]["version"]}
                if system == "DBOS"
                else {}
            )
            for system in systems
        }
        print_table(result)
        print_profiles(result)
    except Exception as e:
        failed = True
        result["error"] = f"{type(e).__name__}: {e}"
        log(f"FAILED: {result['error']}")
    finally:
        children.kill_all()
        if not args.keep_logs:
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            log(f"logs kept in {tmp}")
        for name in (FD_DATABASE, DBOS_DATABASE):
            try:
                pg_admin(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
            except Exception as e:
                log(f"could not drop {name}: {e}")
    result["elapsed_s"] = round(time.time() - started, 1)
    result["loadavg_after"] = loadavg()
    log(f"load average after: {result['loadavg_after']}; {result['elapsed_s']} s")
    if output and not failed:
        with open(output, "w") as f:
            json.dump(result, f, indent=2)
            f.write("\n")
        log(f"wrote {os.path.relpath(output, ROOT)}")
    return 1 if failed else 0


if __name__ == "__main__":
    if len(sys.argv) == 6 and sys.argv[1] == "--dbos-worker":
        dbos_worker(sys.argv[2], int(sys.argv[3]), float(sys.argv[4]), sys.argv[5])
    elif len(sys.argv) == 3 and sys.argv[1] == "--dbos-enqueue":
        dbos_enqueue(sys.argv[2])
    else:
        sys.exit(main())
