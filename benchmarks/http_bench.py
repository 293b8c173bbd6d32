"""Scenario 3: over real HTTP, gunicorn (gthread) on loopback.

One gunicorn serves ``/plain/3`` and ``/durable/3``; a bounded load
generator (threads, one ``requests.Session`` each, a fixed number of
requests per batch) alternates batches of the two paths. Only 127.0.0.1 is
ever contacted, and every loop is bounded in count.
"""

from __future__ import annotations

import os
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time

import requests
from common import (
    HERE,
    Mode,
    Report,
    percentile,
    recreate_pg_database,
    retrying,
    temp_dir,
)

WORKERS = 2
THREADS = 4
CLIENTS = 8


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Gunicorn:
    def __init__(self, db_uri: str, workdir: str) -> None:
        self.port = _free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        env = dict(os.environ, BENCH_DB_URI=db_uri)
        gunicorn = os.path.join(os.path.dirname(sys.executable), "gunicorn")
        self.log = open(os.path.join(workdir, "gunicorn.log"), "w")  # noqa: SIM115
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
                if requests.get(self.base + "/plain/3", timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                pass
            if time.monotonic() > deadline:
                self.close()
                raise RuntimeError("gunicorn did not start in 30 s")
            time.sleep(0.1)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


def load(url: str, total: int, clients: int) -> tuple[float, list[float]]:
    """``total`` GETs of ``url`` from ``clients`` threads. Returns the wall
    time and each request's latency (seconds)."""
    per_thread = [total // clients + (i < total % clients) for i in range(clients)]
    latencies: list[list[float]] = [[] for _ in range(clients)]
    errors: list[str] = []
    start = threading.Barrier(clients + 1)

    def worker(i: int) -> None:
        with requests.Session() as session:
            mine = latencies[i]
            start.wait()
            for _ in range(per_thread[i]):
                t0 = time.perf_counter()
                response = session.get(url, timeout=60)
                mine.append(time.perf_counter() - t0)
                if response.status_code != 200:
                    errors.append(f"{response.status_code}: {response.text[:200]}")
                    return

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    if errors:
        raise RuntimeError(f"GET {url} failed: {errors[0]}")
    return wall, [x for lat in latencies for x in lat]


def run(mode: Mode, pg: bool) -> list[Report]:
    report = Report("http", "3. Real HTTP: gunicorn gthread, loopback")
    total = 240 if mode.quick else 800
    rounds = 3 if mode.quick else 5
    dbs = ["sqlite"] + (["postgresql"] if pg else [])
    paths = {"plain": "/plain/3", "durable": "/durable/3"}
    names = list(paths)
    with temp_dir("http") as workdir:
        for db in dbs:

            def measure(
                db: str = db,
            ) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
                if db == "sqlite":
                    name = f"http-{time.monotonic_ns()}.sqlite3"
                    uri = f"sqlite:///{os.path.join(workdir, name)}"
                else:
                    uri = recreate_pg_database("durable_bench")
                server = Gunicorn(uri, workdir)
                try:
                    for path in paths.values():  # warm-up: every worker, thread
                        load(server.base + path, 16 * CLIENTS, CLIENTS)
                    walls: dict[str, list[float]] = {name: [] for name in paths}
                    lats: dict[str, list[float]] = {name: [] for name in paths}
                    for r in range(rounds):
                        for name in names[r % 2 :] + names[: r % 2]:
                            wall, lat = load(server.base + paths[name], total, CLIENTS)
                            walls[name].append(wall)
                            lats[name].extend(lat)
                    return walls, lats
                finally:
                    server.close()

            walls, lats = retrying(f"http {db}", measure)
            ratio = statistics.median(
                p / d for p, d in zip(walls["plain"], walls["durable"], strict=True)
            )
            row: dict[str, object] = {"db": db}
            for name in names:
                row[f"{name}_rps"] = total / statistics.median(walls[name])
                row[f"{name}_p50_ms"] = percentile(lats[name], 50) * 1e3
                row[f"{name}_p99_ms"] = percentile(lats[name], 99) * 1e3
            row["ratio"] = ratio
            report.row(**row)
    report.note(
        f"gunicorn -k gthread -w {WORKERS} --threads {THREADS} on 127.0.0.1; load:"
        f" {CLIENTS} client threads x requests.Session, {total} requests per batch,"
        f" {rounds} interleaved rounds per path; client and server share the 2"
        " cores, so the client's own cost damps the ratio."
    )
    return [report]
