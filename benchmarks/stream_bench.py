"""Streaming: how soon a client sees a chunk, and how many chunks one
stream carries per second.

Scenario (issue 19: "Time from a chunk being produced to the client
receiving it (p50/p99), same process and across processes; chunks per
second one stream sustains"):

- A durable endpoint streams ``--chunks`` items with ``step.stream``; each
  item carries ``time.time()`` at the moment the step function yields it.
  The client asks the endpoint for ``text/event-stream`` and notes when each
  ``chunk`` event arrives; latency = arrival - production (same machine,
  same clock).
- *same process*: the stream is read from the server running the view.
  *across processes*: two server processes on one database; the view runs
  in the first (the second runs no scheduler) and the stream is read from
  the second, which learns of new chunks by PostgreSQL ``NOTIFY`` (on
  SQLite, by polling every 0.25 s at most: ``DURABLE_POLL_INTERVAL``).
- *throughput*: items yielded with no delay; chunks per second from the
  first to the last arrival.

Each chunk is one committed row (that is what makes a late or
reconnecting reader see it), so the rate is bounded by one small commit per
chunk.

Usage::

    python benchmarks/stream_bench.py [--chunks 300] [--backend sqlite|postgres]

Writes ``benchmarks/results/stream.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

import requests

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
APP = """
import os, time
from flask import Flask, jsonify, request
from flask_durable import Durable, step

app = Flask(__name__)
app.config.update(
    SECRET_KEY="bench",
    DURABLE_DATABASE_URI=os.environ["BENCH_DB"],
    DURABLE_SCHEDULER=os.environ.get("BENCH_SCHEDULER", "1") == "1",
    DURABLE_POLL_INTERVAL=0.25,
)
durable = Durable(app)

def items(n, delay):
    for i in range(n):
        if delay:
            time.sleep(delay)
        yield {"i": i, "t": time.time()}

@app.post("/stream")
@durable.endpoint
def stream():
    body = request.get_json()
    out = step.stream("s", items, body["n"], body["delay"])
    return jsonify(n=len(out))
"""


def serve(tmp: str, db: str, port: int, scheduler: bool) -> subprocess.Popen[bytes]:
    env = dict(
        os.environ,
        BENCH_DB=db,
        BENCH_SCHEDULER="1" if scheduler else "0",
        PYTHONPATH=tmp + os.pathsep + ROOT,
    )
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "flask",
            "--app",
            "stream_app",
            "run",
            "--port",
            str(port),
            "--with-threads",
        ],
        cwd=tmp,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            requests.get(f"http://127.0.0.1:{port}/durable/stream/x", timeout=1)
            return proc
        except requests.ConnectionError:
            time.sleep(0.1)
    raise RuntimeError("server did not start")


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def read(url: str, n: int) -> list[tuple[float, float]]:
    """(produced, received) of each chunk of the stream at ``url``."""
    got: list[tuple[float, float]] = []
    with requests.get(url, stream=True, timeout=120) as r:
        name = ""
        for line in r.iter_lines(chunk_size=None, decode_unicode=True):
            if line.startswith("event: "):
                name = line[7:]
            elif line.startswith("data: ") and name == "chunk":
                item = json.loads(line[6:])["data"]
                got.append((item["t"], time.time()))
            elif line.startswith("data: ") and name == "result":
                break
    assert len(got) == n, (len(got), n)
    return got


def run_case(
    first: str, reader: str, n: int, delay: float
) -> list[tuple[float, float]]:
    r = requests.post(
        first + "/stream",
        json={"n": n, "delay": delay},
        headers={"Accept": "text/event-stream"},
        stream=True,
        timeout=30,
    )
    path = r.headers["Location"].replace("/wait/", "/stream/")
    r.close()
    return read(reader + path, n)


def summary(got: list[tuple[float, float]]) -> dict[str, float]:
    lat = sorted((b - a) * 1000 for a, b in got)
    return {
        "p50_ms": statistics.median(lat),
        "p99_ms": lat[min(len(lat) - 1, int(len(lat) * 0.99))],
        "max_ms": lat[-1],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--chunks", type=int, default=300)
    parser.add_argument("--backend", choices=("sqlite", "postgres"), default="sqlite")
    args = parser.parse_args()
    tmp = tempfile.mkdtemp(prefix="durable-stream-")
    with open(os.path.join(tmp, "stream_app.py"), "w") as f:
        f.write(APP)
    drop = None
    if args.backend == "sqlite":
        db = f"sqlite:///{tmp}/stream.sqlite3"
    else:
        sys.path.insert(0, os.path.join(ROOT, "tests"))
        from procs import create_database, drop_database

        db = create_database(
            os.environ.get(
                "DURABLE_TEST_POSTGRES_URL",
                "postgresql+psycopg://postgres@127.0.0.1:5432/postgres",
            )
        )
        drop = drop_database
    ports = free_port(), free_port()
    procs = [serve(tmp, db, ports[0], True), serve(tmp, db, ports[1], False)]
    first, second = (f"http://127.0.0.1:{p}" for p in ports)
    results: dict[str, Any] = {"backend": args.backend, "chunks": args.chunks}
    try:
        run_case(first, first, 20, 0.005)  # warm up
        same = run_case(first, first, args.chunks, 0.01)
        cross = run_case(first, second, args.chunks, 0.01)
        burst = run_case(first, first, args.chunks * 5, 0.0)
        rate = len(burst) / (burst[-1][1] - burst[0][1])
        results.update(
            same_process=summary(same),
            across_processes=summary(cross),
            chunks_per_second=rate,
        )
    finally:
        for p in procs:
            p.kill()
        if drop is not None:
            drop(db)
    for name in ("same_process", "across_processes"):
        r = results[name]
        print(
            f"{args.backend:8} {name:17} p50 {r['p50_ms']:6.1f} ms"
            f"  p99 {r['p99_ms']:6.1f} ms  max {r['max_ms']:6.1f} ms"
        )
    rate = results["chunks_per_second"]
    print(f"{args.backend:8} one stream        {rate:.0f} chunks/s")
    out = os.path.join(HERE, "results", "stream.json")
    try:
        with open(out) as f:
            saved = json.load(f)
    except (OSError, ValueError):
        saved = {}
    saved[args.backend] = results
    with open(out, "w") as f:
        json.dump(saved, f, indent=2)


if __name__ == "__main__":
    main()
