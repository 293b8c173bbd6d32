"""PostgreSQL under real servers: gunicorn (gthread with and without
``--preload``, sync) with a worker SIGKILLed mid-load, and the database
server restarted while runs are sleeping or waiting for a retry.

Skipped when ``DURABLE_TEST_POSTGRES_URL`` is not set. Each test gets its
own database (``durable_test_<random>``), dropped afterwards.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import requests
import sqlalchemy as sa
from procs import (
    VENV_BIN,
    Effects,
    ProcessManager,
    app_env,
    check_job,
    check_no_overlap,
    children_of,
    free_port,
    pg_cluster,
    pg_isready,
    read_effects,
    wait_for,
)

pytestmark = [pytest.mark.slow, pytest.mark.postgres]


def _client(url: str, job: str, body: dict[str, Any], deadline: float) -> Any:
    """A client that follows redirects (to the wait URL) and, when a crash
    cuts its connection, retries with the same ``Idempotency-Key``."""
    problems: list[str] = []
    while time.monotonic() < deadline:
        try:
            r = requests.post(
                url + "/work",
                json=body,
                headers={"Idempotency-Key": job},
                timeout=30,
            )
        except requests.RequestException as e:
            problems.append(type(e).__name__)
            time.sleep(0.2)
            continue
        if r.status_code == 409:  # the key's first request is still starting
            problems.append("409")
            time.sleep(0.2)
            continue
        return r, problems
    return None, problems


def _in_flight(effects: Effects, pids: set[int]) -> list[int]:
    """Pids among ``pids`` that are executing a step right now."""
    return sorted({e.pid for e in effects.executions if e.end is None} & pids)


# -- 3. gunicorn, a worker SIGKILLed while runs execute --------------------


@pytest.mark.parametrize(
    ("worker_class", "preload", "jobs"),
    [
        pytest.param("gthread", False, 60, id="gthread"),
        pytest.param("gthread", True, 60, id="gthread-preload"),
        pytest.param("sync", False, 12, id="sync"),
    ],
)
def test_gunicorn_worker_sigkilled(
    procs: ProcessManager,
    tmp_path: Path,
    pg_url: str,
    worker_class: str,
    preload: bool,
    jobs: int,
) -> None:
    port = free_port()
    nworkers = 3 if worker_class == "gthread" else 2
    args = [
        str(VENV_BIN / "gunicorn"),
        "--bind",
        f"127.0.0.1:{port}",
        "--worker-class",
        worker_class,
        "--workers",
        str(nworkers),
        "--timeout",
        "60",
        "--graceful-timeout",
        "2",
    ]
    if worker_class == "gthread":
        args += ["--threads", "4"]
    if preload:
        args.append("--preload")
    args.append("procs.app:app")
    # Short long-polls, so that waiting clients do not hold every thread.
    wait_timeout = "2" if worker_class == "gthread" else "1"
    env = app_env(tmp_path, pg_url, DURABLE_WAIT_TIMEOUT=wait_timeout)
    master = procs.start(
        f"gunicorn-{worker_class}", args, env, url=f"http://127.0.0.1:{port}"
    )
    master.wait_healthy()
    workers = wait_for(
        lambda: (pids := children_of(master.pid)) and len(pids) == nworkers and pids,
        30,
        f"{nworkers} gunicorn workers",
    )
    seen_workers = set(workers)

    deadline = time.monotonic() + 120
    bodies = {f"g-{i}": {"job": f"g-{i}", "sleep": 0.3} for i in range(jobs)}
    with ThreadPoolExecutor(jobs, thread_name_prefix="client") as pool:
        futures = {
            job: pool.submit(_client, master.url, job, body, deadline)
            for job, body in bodies.items()
        }
        # Midway (a third of the runs are in their slow step), SIGKILL a
        # worker that is executing a step right now.
        wait_for(
            lambda: (
                sum(1 for e in read_effects(tmp_path).executions if e.step == "b")
                >= jobs // 3
            ),
            60,
            "a third of the runs to reach step b",
            interval=0.02,
        )
        current = set(children_of(master.pid))
        seen_workers |= current
        busy = _in_flight(read_effects(tmp_path), current)
        victim = busy[0] if busy else sorted(current)[0]
        os.kill(victim, signal.SIGKILL)
        killed_at = time.time()
        results = {job: f.result() for job, f in futures.items()}
        seen_workers |= set(children_of(master.pid))

    assert master.alive(), procs.dump()
    failed = {job: res for job, res in results.items() if res[0] is None}
    assert not failed, f"clients without an answer: {failed}\n{procs.dump()}"
    effects = read_effects(tmp_path)
    for job, (response, _problems) in results.items():
        assert response.status_code == 200, (job, response.status_code, response.text)
        body = response.json()
        assert body["job"] == job
        committed = {name: value["x"] for name, value in body["steps"].items()}
        check_job(effects, job, committed, killed=[victim], designed_failures={"a": 1})
    check_no_overlap(effects.executions, {victim: killed_at})
    pids = {e.pid for e in effects.executions}
    assert master.pid not in pids, "a step ran in the gunicorn master"
    # Steps ran in the forked workers only (the respawned one included).
    seen_workers |= set(children_of(master.pid))
    assert pids <= seen_workers
    # Whichever worker answers runs exactly one scheduler (it starts
    # lazily on a worker's first request, after the fork).
    for _ in range(2 * nworkers):
        health = settled_health(master)
        assert health["pid"] in seen_workers
        assert health["threads"].count("APScheduler") == 1, health


def settled_health(server: Any) -> dict[str, Any]:
    """``/health`` once the scheduler that a worker's first request starts
    (in a thread of its own, so that no request waits for it) is up."""
    for _ in range(100):
        health: dict[str, Any] = server.get("/health").json()
        if "durable-start" not in health["threads"]:
            return health
        time.sleep(0.05)
    raise AssertionError(f"the scheduler did not start: {health}")


# -- 4. PostgreSQL restarted while runs sleep or wait for a retry ----------


def _skip_unless_restartable(url: str) -> tuple[str, str]:
    cluster = pg_cluster()
    if cluster is None:
        pytest.skip("pg_ctlcluster (postgresql-common) is not available")
    if os.geteuid() != 0:
        pytest.skip("restarting PostgreSQL with pg_ctlcluster needs root")
    host = sa.engine.make_url(url).host
    if host not in ("127.0.0.1", "localhost", "::1"):
        pytest.skip(f"PostgreSQL at {host} is not the local cluster")
    return cluster


def _restart_postgres(url: str, cluster: tuple[str, str]) -> None:
    version, name = cluster
    subprocess.run(
        ["pg_ctlcluster", "--skip-systemctl-redirect", version, name, "restart"],
        check=True,
        capture_output=True,
        timeout=120,
    )
    wait_for(lambda: pg_isready(url), 60, "PostgreSQL to accept connections again")


def _status(server: Any, run_id: str) -> dict[str, Any] | None:
    try:
        r = server.get(f"/status/{run_id}", timeout=10)
    except requests.RequestException:
        return None
    if r.status_code != 200:
        return None
    info = r.json()
    return info if info["status"] in ("completed", "failed", "cancelled") else None


def _postmaster_started(url: str) -> Any:
    engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
    try:
        with engine.connect() as conn:
            return conn.execute(sa.text("SELECT pg_postmaster_start_time()")).scalar()
    finally:
        engine.dispose()


def test_postgres_restart_while_runs_are_suspended(
    procs: ProcessManager, tmp_path: Path, pg_url: str
) -> None:
    cluster = _skip_unless_restartable(pg_url)
    server = procs.serve("server", app_env(tmp_path, pg_url))
    pid = server.wait_healthy()["pid"]
    prefer = {"Prefer": "respond-async"}
    # One run waits for an event (certainly suspended across the restart),
    # one sleeps and one waits for its retry (due shortly after it).
    waiter = server.post(
        "/nap", json={"job": "waiter", "wait": True, "nap": 0.5}, headers=prefer
    )
    sleeper = server.post("/nap", json={"job": "sleeper", "nap": 3}, headers=prefer)
    retry = server.post(
        "/work", json={"job": "retry", "retry_at": time.time() + 3}, headers=prefer
    )
    for response in (waiter, sleeper, retry):
        assert response.status_code == 202, response.text

    before = _postmaster_started(pg_url)
    _restart_postgres(pg_url, cluster)
    assert _postmaster_started(pg_url) != before, "PostgreSQL was not restarted"

    waiter_id = waiter.headers["Durable-Run-Id"]
    r = wait_for(lambda: server.get(f"/status/{waiter_id}"), 30, "the waiting run")
    assert r.status_code == 200 and r.json()["status"] == "waiting", r.text
    sent = wait_for(
        lambda: (
            (
                resp := server.post(
                    "/durable/events",
                    json={"name": "go", "data": {"job": "waiter"}},
                    headers={"Authorization": "Bearer procs-event-key"},
                )
            ).status_code
            == 202
            and resp
        ),
        30,
        "the event to be accepted",
    )
    assert sent.json()["ids"]

    finals = {}
    for job, response in (("waiter", waiter), ("sleeper", sleeper), ("retry", retry)):
        run_id = response.headers["Durable-Run-Id"]
        info = wait_for(
            lambda r=run_id: _status(server, r), 60, f"run {run_id} to finish"
        )
        assert info["status"] == "completed", info
        # The wait URL answers with the stored final response.
        final = server.get(response.headers["Location"], timeout=30)
        assert final.status_code == 200, final.text
        assert final.json() == json.loads(info["response"]["body"])
        finals[job] = {k: v["x"] for k, v in final.json()["steps"].items()}
    effects = read_effects(tmp_path)
    check_job(effects, "waiter", finals["waiter"])
    check_job(effects, "sleeper", finals["sleeper"])
    check_job(effects, "retry", finals["retry"], designed_failures={"a": 1})
    assert {e.pid for e in effects.executions} == {pid}
    # New runs work after the restart as well.
    fresh = server.post("/work", json={"job": "fresh", "fail_once": False})
    assert fresh.status_code == 200, fresh.text
