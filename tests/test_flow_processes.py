"""Flow control across real processes, on SQLite and PostgreSQL, checked
against an O_APPEND ledger of each step's start and end: a concurrency
limit holds across two servers, slots held by a SIGKILLed process come back
after its lease, and a throttle spreads starts."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import requests
from procs import ProcessManager, app_env, read_effects, wait_for

pytestmark = pytest.mark.slow

ADMIN = {"X-Admin": "yes"}
BACKENDS = ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]


def _db(tmp_path: Path, request: pytest.FixtureRequest, backend: str) -> str:
    if backend == "sqlite":
        return f"sqlite:///{tmp_path / 'durable.sqlite3'}"
    return str(request.getfixturevalue("pg_url"))


def max_overlap(spans: list[tuple[float, float]]) -> int:
    """The most spans open at one instant."""
    edges = sorted([(s, 1) for s, _ in spans] + [(e, -1) for _, e in spans])
    open_, most = 0, 0
    for _, delta in edges:
        open_ += delta
        most = max(most, open_)
    return most


def _runs(server: Any, endpoint: str) -> list[dict[str, Any]]:
    r = requests.get(
        f"{server.url}/durable/api/runs",
        params={"endpoint": endpoint, "limit": 1000},
        headers=ADMIN,
        timeout=10,
    )
    assert r.status_code == 200, r.text
    runs: list[dict[str, Any]] = r.json()["runs"]
    return runs


@pytest.mark.parametrize("backend", BACKENDS)
def test_concurrency_limit_holds_across_processes(
    procs: ProcessManager,
    tmp_path: Path,
    request: pytest.FixtureRequest,
    backend: str,
) -> None:
    env = app_env(tmp_path, _db(tmp_path, request, backend), DURABLE_WAIT_TIMEOUT=20)
    servers = [procs.serve(f"server{i}", env) for i in range(2)]
    for server in servers:
        server.wait_healthy()

    def post(i: int) -> requests.Response:
        server = servers[i % 2]
        return requests.post(
            server.url + "/limited", json={"job": f"j{i}", "sleep": 0.05}, timeout=60
        )

    with ThreadPoolExecutor(12, thread_name_prefix="client") as pool:
        answers = list(pool.map(post, range(40)))
    assert [r.status_code for r in answers] == [200] * 40, [
        (r.status_code, r.text[:200]) for r in answers if r.status_code != 200
    ]
    effects = read_effects(tmp_path).executions
    assert sorted(e.job for e in effects) == sorted(f"j{i}" for i in range(40))
    spans = [(e.start, e.end) for e in effects if e.end is not None]
    assert len(spans) == 40
    assert max_overlap(spans) <= 3
    # Both processes executed runs: the limit is shared, not per process.
    assert len({e.pid for e in effects}) == 2
    runs = _runs(servers[0], "limited")
    assert len(runs) == 40 and {r["status"] for r in runs} == {"completed"}


@pytest.mark.parametrize("backend", BACKENDS)
def test_slots_of_a_killed_process_come_back(
    procs: ProcessManager,
    tmp_path: Path,
    request: pytest.FixtureRequest,
    backend: str,
) -> None:
    env = app_env(tmp_path, _db(tmp_path, request, backend), DURABLE_WAIT_TIMEOUT=2)
    victim = procs.serve("victim", dict(env, DURABLE_SCHEDULER="0"))
    survivor = procs.serve("survivor", env)
    victim.wait_healthy()
    survivor.wait_healthy()
    (tmp_path / "hold").touch()
    blocked = [f"held{i}" for i in range(3)]
    with ThreadPoolExecutor(8, thread_name_prefix="client") as pool:
        for job in blocked:
            pool.submit(
                requests.post,
                victim.url + "/limited",
                json={"job": job, "block": True},
                timeout=30,
            )
        for job in blocked:
            wait_for(lambda job=job: (tmp_path / f"inside-{job}").exists(), 30, job)
        # The three slots are taken: these are queued, answered 202.
        queued = [
            requests.post(
                survivor.url + "/limited",
                json={"job": f"q{i}"},
                headers={"Prefer": "respond-async"},
                timeout=10,
            )
            for i in range(4)
        ]
        assert [r.status_code for r in queued] == [202] * 4
        assert {r.json()["status"] for r in queued} == {"queued"}
        time.sleep(0.5)
        assert not any(e.job.startswith("q") for e in read_effects(tmp_path).executions)
        victim.kill()
        (tmp_path / "hold").unlink()

        def all_done() -> bool:
            runs = _runs(survivor, "limited")
            return len(runs) == 7 and all(r["status"] == "completed" for r in runs)

        wait_for(all_done, 40, "the queued and the killed runs to complete")
    effects = read_effects(tmp_path).executions
    for job in blocked:  # cut by the kill, then redone by the survivor
        mine = [e for e in effects if e.job == job]
        assert [e.pid for e in mine][-1] == survivor.pid and mine[-1].outcome == "ok"
    done = [(e.start, e.end) for e in effects if e.end is not None]
    assert max_overlap(done) <= 3


@pytest.mark.parametrize("backend", BACKENDS)
def test_throttle_spreads_function_starts(
    procs: ProcessManager,
    tmp_path: Path,
    request: pytest.FixtureRequest,
    backend: str,
) -> None:
    env = app_env(tmp_path, _db(tmp_path, request, backend))
    server = procs.serve("server", dict(env, DURABLE_SCHEDULER="0"))
    server.wait_healthy()
    workers = [procs.worker(f"worker{i}", env) for i in range(2)]
    for w in workers:
        wait_for(lambda w=w: "flask-durable worker for" in w.output(), 30, w.name)
    events = [{"name": "throttle/go", "data": {"job": f"t{i}"}} for i in range(30)]
    r = requests.post(
        server.url + "/durable/events",
        json=events,
        headers={"Authorization": "Bearer procs-event-key"},
        timeout=10,
    )
    assert r.status_code == 202, r.text
    wait_for(
        lambda: len([e for e in read_effects(tmp_path).executions if e.end]) == 30,
        60,
        "every throttled run",
    )
    starts = sorted(e.start for e in read_effects(tmp_path).executions)
    # 10 a second, one at a time: in any second, at most 10 (+1 for the
    # edges of the window).
    for i, t in enumerate(starts):
        within = [s for s in starts[i:] if s < t + 1.0]
        assert len(within) <= 11, (len(within), starts)
    assert starts[-1] - starts[0] >= 2.0
