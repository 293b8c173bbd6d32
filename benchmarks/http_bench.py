"""Scenario 3: over real HTTP, gunicorn (gthread) on loopback, light client.

For each database (SQLite, PostgreSQL) and checkpoint mode (``"sync"``,
``"async"``) one gunicorn serves ``/plain/3`` and ``/durable/3``; batches of
the two paths alternate (rounds, the order rotating, one uncounted warm-up
batch each). The load comes from a client that costs little CPU, so that the
server, not the client, is what the 2 cores are spent on:

* ``wrk`` (C, epoll, one thread, keep-alive connections) when it is
  installed (Debian: ``apt-get install wrk``);
* else a single-threaded Python client on raw non-blocking sockets
  (``selectors``), keep-alive, one request in flight per connection, as wrk.

``BENCH_HTTP_CLIENT=python`` forces the Python client. Per batch are
measured: completed requests and duration (throughput), p50/p99 latency, the
CPU time of the gunicorn master and workers (``/proc/<pid>/stat``
``utime + stime``, read before the batch and after it, once the server is
idle again), the CPU time of the database's PostgreSQL backends (their pids
from ``pg_stat_activity``), the client's CPU time and the machine's busy
time (``/proc/stat``). Only 127.0.0.1 is ever contacted, and every loop is
bounded in time.
"""

from __future__ import annotations

import json
import os
import resource
import selectors
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any

from common import (
    HERE,
    PG_ADMIN_URL,
    PG_DATABASE,
    Mode,
    Report,
    log,
    recreate_pg_database,
    retrying,
    temp_dir,
)

WORKERS = 2
THREADS = 4
#: Keep-alive connections: one per server thread, so that every thread has a
#: request to serve and none waits in a queue.
CONNECTIONS = 8
#: A batch in which one worker used less than this share of the other's CPU
#: is run again (at most ``ATTEMPTS`` times): the worker that wakes first
#: sometimes accepts all of a client's connections (about 1 batch in 4 here,
#: the other worker then uses ~0% of its CPU; otherwise 0.6-1.0), which
#: leaves one core to the whole load. Capping each worker with
#: ``--worker-connections 4`` would balance them, but gthread then closes
#: every connection after its response (it keeps at most
#: ``worker_connections - threads`` connections alive).
BALANCE = 0.25
ATTEMPTS = 4
#: After a batch the server counts as idle once it used at most one clock
#: tick of CPU in this many seconds.
IDLE_CHECK = 0.05
PATHS = {"plain": "/plain/3", "durable": "/durable/3"}
CLK_TCK = os.sysconf("SC_CLK_TCK")

#: wrk prints the batch's figures as one JSON line when it is done
#: (latencies in microseconds, duration in microseconds).
WRK_SCRIPT = """
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '{"requests": %d, "duration_us": %d, "p50_us": %d, "p99_us": %d,' ..
    ' "errors": %d, "status_errors": %d}\\n',
    summary.requests, summary.duration,
    latency:percentile(50), latency:percentile(99),
    e.connect + e.read + e.write + e.timeout, e.status))
end
"""


# -- CPU accounting -------------------------------------------------------------


def proc_cpu(pid: int) -> float:
    """CPU seconds (user + system, all threads) of process ``pid``; 0 if it
    is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return 0.0
    # After "(comm)": state is field 3, utime 14 and stime 15 (1-based).
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def children(pid: int) -> list[int]:
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (FileNotFoundError, ProcessLookupError, IndexError, ValueError):
            continue
        if ppid == pid:
            found.append(int(name))
    return found


def machine_busy() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine since boot."""
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:]]
    idle = values[3] + values[4]  # idle + iowait
    total = sum(values[:8])  # without guest time, already in user
    return (total - idle) / CLK_TCK, total / CLK_TCK


class PgBackends:
    """CPU of the PostgreSQL backends connected to the benchmark database
    (the server runs on this machine; its pids come from
    ``pg_stat_activity``)."""

    def __init__(self) -> None:
        import sqlalchemy as sa

        self.sa = sa
        self.engine = sa.create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
        self.conn = self.engine.connect()

    def snapshot(self) -> dict[int, float]:
        pids = self.conn.execute(
            self.sa.text("SELECT pid FROM pg_stat_activity WHERE datname = :d"),
            {"d": PG_DATABASE},
        ).scalars()
        return {pid: proc_cpu(pid) for pid in pids}

    @staticmethod
    def spent(before: dict[int, float], after: dict[int, float]) -> float:
        return sum(cpu - before.get(pid, 0.0) for pid, cpu in after.items())

    def close(self) -> None:
        self.conn.close()
        self.engine.dispose()


# -- server -------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _get(port: int, path: str, timeout: float = 5.0) -> tuple[int, bytes]:
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


class Gunicorn:
    def __init__(self, db_uri: str, checkpoint: str, workdir: str) -> None:
        self.port = _free_port()
        env = dict(os.environ, BENCH_DB_URI=db_uri, BENCH_CHECKPOINT=checkpoint)
        gunicorn = os.path.join(os.path.dirname(sys.executable), "gunicorn")
        self.log = open(  # noqa: SIM115 (closed in close())
            os.path.join(workdir, f"gunicorn-{checkpoint}.log"), "w"
        )
        self.proc = subprocess.Popen(
            [
                gunicorn,
                "--worker-class",
                "gthread",
                "--workers",
                str(WORKERS),
                "--threads",
                str(THREADS),
                "--bind",
                f"127.0.0.1:{self.port}",
                "--chdir",
                HERE,
                "--log-level",
                "warning",
                "--backlog",
                "256",
                "apps:http_app()",
            ],
            env=env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 30
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"gunicorn exited, see {self.log.name}")
            try:
                if _get(self.port, PATHS["plain"], timeout=2)[0] == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.close()
                raise RuntimeError("gunicorn did not start in 30 s")
            time.sleep(0.1)
        self.pids = [self.proc.pid]
        deadline = time.monotonic() + 10
        while len(self.pids) < WORKERS + 1 and time.monotonic() < deadline:
            self.pids = [self.proc.pid, *children(self.proc.pid)]
            time.sleep(IDLE_CHECK)

    def cpu(self) -> float:
        """CPU seconds of the master and its workers."""
        return sum(proc_cpu(pid) for pid in self.pids)

    def worker_cpu(self) -> list[float]:
        return [proc_cpu(pid) for pid in self.pids[1:]]

    def settle(self, limit: float = 10.0) -> float:
        """Wait (at most ``limit`` s) until the server is idle: in async mode
        the writer threads may still be committing the batch's steps.
        Returns the seconds it took."""
        start = time.monotonic()
        last = self.cpu()
        while time.monotonic() - start < limit:
            time.sleep(IDLE_CHECK)
            now = self.cpu()
            if now - last <= 1.0 / CLK_TCK:
                break
            last = now
        return time.monotonic() - start

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


# -- clients --------------------------------------------------------------------


@dataclass
class Batch:
    requests: int
    seconds: float
    p50: float  # seconds
    p99: float
    client_cpu: float  # CPU seconds the client used


class WrkClient:
    name = "wrk"

    def __init__(self, workdir: str) -> None:
        self.script = os.path.join(workdir, "report.lua")
        with open(self.script, "w") as f:
            f.write(WRK_SCRIPT)
        self.wrk = shutil.which("wrk") or "wrk"

    def describe(self) -> str:
        out = subprocess.run(
            [self.wrk, "--version"], capture_output=True, text=True, check=False
        )
        first = (out.stdout or out.stderr).splitlines()
        return first[0].split(" Copyright")[0] if first else "wrk"

    def batch(self, port: int, path: str, seconds: float) -> Batch:
        """wrk's ``-d`` takes whole seconds: it is given a longer duration
        and stopped with SIGINT after ``seconds`` (it checks every 100 ms,
        then reports as at the end of ``-d``; the duration it reports is
        the one it ran)."""
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        proc = subprocess.Popen(
            [
                self.wrk,
                "-t1",
                f"-c{CONNECTIONS}",
                f"-d{int(seconds) + 10}s",
                "--timeout",
                "10s",
                "-s",
                self.script,
                f"http://127.0.0.1:{port}{path}",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            time.sleep(seconds)
            proc.send_signal(signal.SIGINT)
            stdout, stderr = proc.communicate(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        lines = [x for x in stdout.splitlines() if x.startswith("{")]
        if proc.returncode != 0 or not lines:
            raise RuntimeError(f"wrk failed: {stderr.strip() or stdout[-300:]}")
        got = json.loads(lines[-1])
        if got["errors"] or got["status_errors"] or not got["requests"]:
            _, body = _get(port, path)
            raise RuntimeError(
                f"GET {path}: {got}; a single GET answers {body[:300]!r}"
            )
        cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
        return Batch(
            requests=got["requests"],
            seconds=got["duration_us"] / 1e6,
            p50=got["p50_us"] / 1e6,
            p99=got["p99_us"] / 1e6,
            client_cpu=cpu,
        )


class PythonClient:
    """One thread, raw non-blocking sockets, ``CONNECTIONS`` keep-alive
    connections with one request in flight each (a closed loop, as wrk)."""

    name = "python"

    def describe(self) -> str:
        return "Python selectors client (1 thread, raw sockets)"

    def batch(self, port: int, path: str, seconds: float) -> Batch:
        request = (f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n").encode()
        sel = selectors.DefaultSelector()
        socks = []
        cpu0 = time.process_time()
        for _ in range(CONNECTIONS):
            s = socket.create_connection(("127.0.0.1", port), timeout=10)
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            s.setblocking(False)
            socks.append(s)
        latencies: list[float] = []
        perf = time.perf_counter
        start = perf()
        end = start + seconds
        hard_end = end + 30
        # per connection: [socket, buffer, sent at, bytes of the response]
        states: list[list[Any]] = []
        for s in socks:
            state = [s, bytearray(), perf(), 0]
            s.send(request)
            sel.register(s, selectors.EVENT_READ, state)
            states.append(state)
        active = len(states)
        last = start
        try:
            while active:
                if perf() > hard_end:
                    raise RuntimeError(f"GET {path}: no answer in 30 s")
                for key, _ in sel.select(timeout=1.0):
                    state = key.data
                    s, buf = state[0], state[1]
                    data = s.recv(65536)
                    if not data:
                        raise RuntimeError(f"GET {path}: connection closed")
                    buf += data
                    while True:
                        if not state[3]:
                            head_end = buf.find(b"\r\n\r\n")
                            if head_end < 0:
                                break
                            head = bytes(buf[:head_end]).lower()
                            if not head.startswith(b"http/1.1 200"):
                                raise RuntimeError(f"GET {path}: {bytes(buf[:300])!r}")
                            at = head.index(b"content-length:") + 15
                            stop = head.find(b"\r\n", at)
                            length = int(head[at : stop if stop > 0 else None])
                            state[3] = head_end + 4 + length
                        if len(buf) < state[3]:
                            break
                        now = perf()
                        latencies.append(now - state[2])
                        last = now
                        del buf[: state[3]]
                        state[3] = 0
                        if now < end:
                            state[2] = now
                            s.send(request)
                        else:
                            sel.unregister(s)
                            active -= 1
                            break
        finally:
            sel.close()
            for s in socks:
                s.close()
        cpu = time.process_time() - cpu0
        latencies.sort()
        return Batch(
            requests=len(latencies),
            seconds=last - start,
            p50=latencies[len(latencies) // 2],
            p99=latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))],
            client_cpu=cpu,
        )


def make_client(workdir: str) -> WrkClient | PythonClient:
    wanted = os.environ.get("BENCH_HTTP_CLIENT", "")
    if wanted != "python" and shutil.which("wrk"):
        return WrkClient(workdir)
    if wanted == "wrk":
        raise RuntimeError("BENCH_HTTP_CLIENT=wrk but wrk is not installed")
    return PythonClient()


# -- the scenario -------------------------------------------------------------


@dataclass
class Measured:
    """One counted batch."""

    rps: float
    drained_rps: float  # requests / (batch + time the server took to be idle)
    p50: float
    p99: float
    server_us: float  # gunicorn CPU per request
    pg_us: float | None  # PostgreSQL backends' CPU per request
    client_us: float
    server_cores: float  # gunicorn (+ PostgreSQL) CPU / (batch + drain) time
    other_cores: float  # the rest of the machine's busy time / wall time
    tail: float  # seconds until the server was idle after the batch
    attempts: int  # 1 + batches run again because one worker had the load


def measure_batch(
    server: Gunicorn,
    client: WrkClient | PythonClient,
    pg: PgBackends | None,
    path: str,
    seconds: float,
) -> Measured:
    for attempt in range(1, ATTEMPTS + 1):
        server.settle()
        pg0 = pg.snapshot() if pg else {}
        cpu0 = server.cpu()
        workers0 = server.worker_cpu()
        busy0, _ = machine_busy()
        w0 = time.perf_counter()
        batch = client.batch(server.port, path, seconds)
        tail = server.settle()
        wall = time.perf_counter() - w0
        cpu = server.cpu() - cpu0
        workers = [b - a for a, b in zip(workers0, server.worker_cpu(), strict=True)]
        if min(workers) >= BALANCE * max(workers) or attempt == ATTEMPTS:
            break
    busy = machine_busy()[0] - busy0
    pg_cpu = PgBackends.spent(pg0, pg.snapshot()) if pg else 0.0
    n = batch.requests
    own = cpu + pg_cpu + batch.client_cpu
    return Measured(
        rps=n / batch.seconds,
        drained_rps=n / (batch.seconds + max(0.0, tail - IDLE_CHECK)),
        p50=batch.p50,
        p99=batch.p99,
        server_us=cpu / n * 1e6,
        pg_us=pg_cpu / n * 1e6 if pg else None,
        client_us=batch.client_cpu / n * 1e6,
        server_cores=(cpu + pg_cpu) / (batch.seconds + max(0.0, tail - IDLE_CHECK)),
        other_cores=max(0.0, busy - own) / wall,
        tail=tail,
        attempts=attempt,
    )


def run(mode: Mode, pg: bool) -> list[Report]:
    report = Report("http", "3. Real HTTP: gunicorn gthread, loopback, light client")
    seconds = 0.5 if mode.quick else 1.0
    rounds = 2 if mode.quick else 6
    dbs = ["sqlite"] + (["postgresql"] if pg else [])
    names = list(PATHS)
    details: dict[str, Any] = {}
    with temp_dir("http") as workdir:
        client = make_client(workdir)
        for db in dbs:
            for checkpoint in ("sync", "async"):

                def measure(
                    db: str = db, checkpoint: str = checkpoint
                ) -> dict[str, list[Measured]]:
                    backends = None
                    if db == "sqlite":
                        name = f"http-{checkpoint}-{time.monotonic_ns()}.sqlite3"
                        uri = f"sqlite:///{os.path.join(workdir, name)}"
                    else:
                        uri = recreate_pg_database(PG_DATABASE)
                    server = Gunicorn(uri, checkpoint, workdir)
                    try:
                        if db == "postgresql":
                            backends = PgBackends()
                        for path in PATHS.values():  # warm-up: workers, pools
                            client.batch(server.port, path, 0.3)
                        got: dict[str, list[Measured]] = {n: [] for n in names}
                        for r in range(rounds):
                            for name in names[r % 2 :] + names[: r % 2]:
                                got[name].append(
                                    measure_batch(
                                        server, client, backends, PATHS[name], seconds
                                    )
                                )
                        return got
                    finally:
                        if backends is not None:
                            backends.close()
                        server.close()

                log(f"http {db} {checkpoint} ...")
                got = retrying(f"http {db} {checkpoint}", measure)
                report.row(**_row(db, checkpoint, got))
                details[f"{db}/{checkpoint}"] = {
                    name: [m.__dict__ for m in got[name]] for name in names
                }
                _note_cores(report, db, checkpoint, got)
    report.data["batches"] = details
    report.data["client"] = client.describe()
    report.notes.insert(
        0,
        f"gunicorn -k gthread -w {WORKERS} --threads {THREADS} on 127.0.0.1, one"
        f" server per (db, checkpoint); client: {client.describe()},"
        f" {CONNECTIONS} keep-alive connections, one request in flight each;"
        f" {rounds} interleaved rounds of {seconds} s batches per path (+1"
        " warm-up). Figures are medians over rounds. ratio = durable/plain"
        " req/s; ratio_drained = the same with each batch's time extended until"
        " the server was idle again (durable_drain_s, the async writer"
        " catching up); cpu_ratio = plain/durable gunicorn CPU per request"
        " (ratios: medians of per-round ratios). *_cpu_us = CPU of the gunicorn"
        " master + workers per request, drain included; durable_pg_us = CPU of"
        " the database's PostgreSQL backends per durable request (the plain view"
        " uses none); client_us = the client's CPU per request.",
    )
    return [report]


def _med(values: list[float]) -> float:
    return statistics.median(values)


def _row(db: str, checkpoint: str, got: dict[str, list[Measured]]) -> dict[str, Any]:
    plain, durable = got["plain"], got["durable"]
    row: dict[str, Any] = {"db": db, "checkpoint": checkpoint}
    row["plain_rps"] = _med([m.rps for m in plain])
    row["durable_rps"] = _med([m.rps for m in durable])
    row["ratio"] = _med([d.rps / p.rps for p, d in zip(plain, durable, strict=True)])
    row["ratio_drained"] = _med(
        [d.drained_rps / p.drained_rps for p, d in zip(plain, durable, strict=True)]
    )
    for name, ms in (("plain", plain), ("durable", durable)):
        row[f"{name}_p50_ms"] = _med([m.p50 for m in ms]) * 1e3
        row[f"{name}_p99_ms"] = _med([m.p99 for m in ms]) * 1e3
    row["plain_cpu_us"] = _med([m.server_us for m in plain])
    row["durable_cpu_us"] = _med([m.server_us for m in durable])
    row["cpu_ratio"] = _med(
        [p.server_us / d.server_us for p, d in zip(plain, durable, strict=True)]
    )
    # The plain view does not touch the database (0 when measured).
    row["durable_pg_us"] = (
        _med([m.pg_us or 0.0 for m in durable])
        if durable[0].pg_us is not None
        else None
    )
    row["durable_drain_s"] = _med([max(0.0, m.tail - IDLE_CHECK) for m in durable])
    row["client_us"] = _med([m.client_us for m in plain + durable])
    return row


def _note_cores(
    report: Report, db: str, checkpoint: str, got: dict[str, list[Measured]]
) -> None:
    parts = []
    for name in PATHS:
        ms = got[name]
        parts.append(
            f"{name} {_med([m.server_cores for m in ms]):.2f}"
            f" (+{_med([m.other_cores for m in ms]):.2f} other)"
        )
    batches = got["plain"] + got["durable"]
    reruns = sum(m.attempts - 1 for m in batches)
    report.note(
        f"{db} {checkpoint}: cores used by the server"
        f"{' and its PostgreSQL backends' if db == 'postgresql' else ''}: "
        + ", ".join(parts)
        + f"; {reruns} batch(es) run again (one worker had the load)"
    )
