"""Streams across real processes, on SQLite and PostgreSQL: a stream read
from another process than the one running the view gets every chunk live,
and a stream whose process is SIGKILLed mid-answer goes on from the process
that takes the run over."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import pytest
import requests
from procs import ProcessManager, app_env, wait_for

pytestmark = pytest.mark.slow

BACKENDS = ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]


def _db(tmp_path: Path, request: pytest.FixtureRequest, backend: str) -> str:
    if backend == "sqlite":
        return f"sqlite:///{tmp_path / 'durable.sqlite3'}"
    return str(request.getfixturevalue("pg_url"))


def events_of(response: requests.Response, seen: list[Any]) -> None:
    name, data = "", ""
    for line in response.iter_lines(decode_unicode=True):
        if line.startswith("event: "):
            name = line[7:]
        elif line.startswith("data: "):
            data += line[6:]
        elif line == "" and name:
            seen.append((name, json.loads(data)))
            if name == "result":
                return
            name, data = "", ""


@pytest.mark.parametrize("backend", BACKENDS)
def test_stream_continues_from_another_process_after_sigkill(
    procs: ProcessManager,
    tmp_path: Path,
    request: pytest.FixtureRequest,
    backend: str,
) -> None:
    env = app_env(tmp_path, _db(tmp_path, request, backend))
    victim = procs.serve("victim", env)
    # The reader runs no scheduler: the run is the victim's, then a worker's.
    reader = procs.serve("reader", dict(env, DURABLE_SCHEDULER="0"))
    victim_pid = victim.wait_healthy()["pid"]
    reader.wait_healthy()
    (tmp_path / "hold").touch()

    # The view runs in the victim; the stream is read from the other process.
    r = requests.post(
        victim.url + "/talk",
        json={"job": "t", "block": True},
        headers={"Accept": "text/event-stream"},
        stream=True,
        timeout=30,
    )
    stream_path = r.headers["Location"].replace("/wait/", "/stream/")
    r.close()
    wait_for(lambda: (tmp_path / "inside-t").exists(), 30, "the view to hold")
    seen: list[Any] = []
    with requests.get(reader.url + stream_path, stream=True, timeout=60) as live:
        thread = threading.Thread(target=events_of, args=(live, seen))
        thread.start()
        wait_for(
            lambda: (
                [d["data"] for n, d in seen if n == "chunk"][:2]
                == [f"w0@{victim_pid}", f"w1@{victim_pid}"]
            ),
            20,
            "the first two words, live, in the other process",
        )
        victim.kill()
        (tmp_path / "hold").unlink()
        worker = procs.worker("worker", env)
        thread.join(60)
    names = [n for n, _ in seen]
    assert names[-1] == "result", seen
    # After the kill: a reset of the step, then the whole answer again from
    # the worker that took the run over (after the lease expired).
    after = names.index("reset")
    words = [d["data"] for n, d in seen[after:] if n == "chunk"]
    assert words == [f"w{i}@{worker.pid}" for i in range(4)]
    body = json.loads(seen[-1][1]["body"])
    assert body["said"] == words and body["pid"] == worker.pid
