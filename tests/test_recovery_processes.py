"""Real processes, real SIGKILL and SIGSTOP, real HTTP: crash recovery on
SQLite, several processes claiming the same due runs, an owner stalled past
its lease, and PostgreSQL restarted under suspended runs.

The app under test is :mod:`procs.app`, run in child processes. Every step
execution is recorded in a log file the children append to (``O_APPEND``),
which no retry can fake: the assertions count executions there and compare
them with the results the runs stored.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import requests
import sqlalchemy as sa
from procs import (
    ProcessManager,
    app_env,
    check_committed_not_rerun,
    check_job,
    check_no_overlap,
    pg_cluster,
    pg_isready,
    read_effects,
    wait_for,
)

pytestmark = pytest.mark.slow


def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'durable.sqlite3'}"


def _post_quietly(url: str, body: Any) -> Any:
    """POST that may be cut off by a SIGKILL of the server."""
    try:
        return requests.post(url, json=body, timeout=60)
    except requests.RequestException as e:
        return e


def _terminal(server: Any, run_id: str) -> dict[str, Any] | None:
    r = server.get(f"/status/{run_id}", timeout=10)
    if r.status_code != 200:
        return None
    info = r.json()
    return info if info["status"] in ("completed", "failed", "cancelled") else None


def _committed(info: dict[str, Any]) -> dict[str, str]:
    """step -> execution id, from a run's stored final response."""
    assert info["status"] == "completed", info
    assert info["response"]["status"] == 200, info
    body = json.loads(info["response"]["body"])
    return {name: value["x"] for name, value in body["steps"].items()}


# -- 1. SIGKILL a server between two steps and inside a step -----------------


@pytest.mark.parametrize("mode", ["between", "inside"])
def test_sigkill_server_then_restart_resumes(
    procs: ProcessManager, tmp_path: Path, mode: str
) -> None:
    env = app_env(tmp_path, sqlite_url(tmp_path))
    server = procs.serve("server", env)
    first_pid = server.wait_healthy()["pid"]
    hold = tmp_path / "hold"
    hold.touch()
    job = f"crash-{mode}"
    with ThreadPoolExecutor(1, thread_name_prefix="client") as pool:
        cut = pool.submit(
            _post_quietly, server.url + "/crash", {"job": job, "mode": mode}
        )
        marker = tmp_path / f"{mode}-{job}"
        run_id = wait_for(
            lambda: marker.exists() and marker.read_text(), 30, f"the {mode} barrier"
        )
        server.kill()
        killed_at = time.time()
        outcome = cut.result(timeout=60)
    assert isinstance(outcome, requests.RequestException), (
        f"the request should have been cut off by the SIGKILL: {outcome!r}"
    )
    hold.unlink()
    effects = read_effects(tmp_path)
    assert effects.count(job, "one") == 1
    assert effects.count(job, "two") == (1 if mode == "inside" else 0)

    # The restarted process starts its scheduler on its first request; the
    # run is resumed once the dead process's lease (2 s) has expired.
    restarted = procs.serve("server-restarted", env)
    second_pid = restarted.wait_healthy()["pid"]
    info = wait_for(lambda: _terminal(restarted, run_id), 40, f"run {run_id} to finish")
    committed = _committed(info)

    effects = read_effects(tmp_path)
    # The committed step ran exactly once, in the killed process.
    ones = [e for e in effects.executions if e.job == job and e.step == "one"]
    assert [e.pid for e in ones] == [first_pid]
    # The step executing at the kill ran at most twice; once to completion.
    twos = [e for e in effects.executions if e.job == job and e.step == "two"]
    assert 1 <= len(twos) <= 2
    assert [e.outcome for e in twos if e.pid == second_pid] == ["ok"]
    assert effects.count(job, "three") == 1
    body = json.loads(info["response"]["body"])
    assert body["pid"] == second_pid
    check_job(effects, job, committed, killed=[first_pid])
    check_no_overlap(effects.executions, {first_pid: killed_at})
    assert {e.pid for e in effects.executions} <= {first_pid, second_pid}


# -- 2. Two worker processes racing for the same due runs --------------------

RACE_RUNS = 200


@pytest.mark.parametrize(
    "backend", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]
)
def test_two_workers_race_for_due_runs(
    procs: ProcessManager,
    tmp_path: Path,
    request: pytest.FixtureRequest,
    backend: str,
) -> None:
    db = (
        sqlite_url(tmp_path)
        if backend == "sqlite"
        else request.getfixturevalue("pg_url")
    )
    env = app_env(tmp_path, db)
    # The process taking the requests runs no scheduler: every retry is
    # left to the two workers.
    creator = procs.serve("creator", dict(env, DURABLE_SCHEDULER="0"))
    creator_pid = creator.wait_healthy()["pid"]
    workers = [procs.worker(f"worker{i}", env) for i in range(2)]
    for w in workers:
        wait_for(
            lambda w=w: "flask-durable worker for" in w.output() or not w.alive(),
            30,
            f"{w.name} to start",
        )
        assert w.alive(), w.output()
    worker_pids = {w.pid for w in workers}

    # Every run's first step fails once and asks to be retried at the same
    # instant: the runs all become due together and both workers race.
    go_at = time.time() + 3.0
    session = requests.Session()

    def create(i: int) -> tuple[str, str]:
        job = f"race-{i}"
        r = session.post(
            creator.url + "/work",
            json={"job": job, "retry_at": go_at},
            headers={"Prefer": "respond-async"},
            timeout=30,
        )
        assert r.status_code == 202, r.text
        return job, r.headers["Durable-Run-Id"]

    with ThreadPoolExecutor(4, thread_name_prefix="client") as pool:
        runs = dict(pool.map(create, range(RACE_RUNS)))
    session.close()

    def all_done() -> bool:
        for w in workers:
            assert w.alive(), procs.dump()
        return len(read_effects(tmp_path).ended("c")) == RACE_RUNS

    try:
        wait_for(all_done, 90, "every run to finish", interval=0.2)
    except AssertionError:
        raise AssertionError(procs.dump()) from None
    infos = {
        job: wait_for(lambda r=run_id: _terminal(creator, r), 20, f"run {run_id}")
        for job, run_id in runs.items()
    }

    effects = read_effects(tmp_path)
    for job, info in infos.items():
        check_job(effects, job, _committed(info), designed_failures={"a": 1})
    check_no_overlap(effects.executions, {})
    first = {e.pid for e in effects.executions if e.step == "a" and e.attempt == 0}
    assert first == {creator_pid}
    resumed = {e.pid for e in effects.executions if e.step != "a" or e.attempt > 0}
    assert resumed <= worker_pids
    assert resumed == worker_pids, "both workers should have resumed runs"


# -- 3. A stalled owner must not run a step another process committed -------


def _run_row(db: str, run_id: str) -> Any:
    """The run's row, read straight from the database (the processes
    under test may be stopped)."""
    engine = sa.create_engine(db, poolclass=sa.pool.NullPool)
    try:
        with engine.connect() as conn:
            return conn.execute(
                sa.text(
                    "SELECT status, attempt, lease_owner FROM durable_runs"
                    " WHERE id = :id"
                ),
                {"id": run_id},
            ).first()
    finally:
        engine.dispose()


@pytest.mark.slow
@pytest.mark.parametrize(
    "backend", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]
)
def test_stalled_owner_does_not_rerun_committed_steps(
    procs: ProcessManager,
    tmp_path: Path,
    request: pytest.FixtureRequest,
    backend: str,
) -> None:
    db = (
        sqlite_url(tmp_path)
        if backend == "sqlite"
        else request.getfixturevalue("pg_url")
    )
    env = app_env(tmp_path, db)  # lease 2 s, sweeps every 0.2 s
    web = procs.serve("web", env)
    web_pid = web.wait_healthy()["pid"]  # also starts its scheduler
    worker = procs.worker("worker", env)
    wait_for(
        lambda: "flask-durable worker for" in worker.output() or not worker.alive(),
        30,
        "the worker to start",
    )
    assert worker.alive(), worker.output()

    job = f"stall-{backend}"
    stopped = False
    with ThreadPoolExecutor(1, thread_name_prefix="client") as pool:
        # The client follows the 303 to the wait URL, like a browser.
        answer = pool.submit(
            requests.post,
            web.url + "/stall",
            json={"job": job, "pause": 3.0},
            timeout=60,
        )
        try:
            one = wait_for(
                lambda: next(
                    (
                        e
                        for e in read_effects(tmp_path).executions
                        if e.job == job and e.step == "one" and e.outcome == "ok"
                    ),
                    None,
                ),
                30,
                "step one to end in the web process",
                interval=0.02,
            )
            assert one.pid == web_pid
            run_id = one.run
            # Stalled in the view code between "one" and "two" (a GC pause,
            # a frozen VM, a laptop lid): the lease (2 s) expires, the worker
            # claims the run and finishes it meanwhile.
            os.kill(web_pid, signal.SIGSTOP)
            stopped = True
            try:
                wait_for(
                    lambda: (row := _run_row(db, run_id)) and row.status == "completed",
                    40,
                    "the worker to finish the run while the web process is stopped",
                    interval=0.2,
                )
            except AssertionError:
                raise AssertionError(procs.dump()) from None
        finally:
            if stopped:
                os.kill(web_pid, signal.SIGCONT)
        # The web process wakes up after its pause: the run is not its own
        # any more.
        response = answer.result(timeout=60)

    info = wait_for(
        lambda: (
            (r := web.get(f"/status/{run_id}", timeout=10)).status_code == 200
            and r.json()["status"] in ("completed", "failed", "cancelled")
            and r.json()
        ),
        30,
        f"run {run_id} to be terminal",
    )
    assert info["status"] == "completed", info
    assert info["response"]["status"] == 200, info
    stored = json.loads(info["response"]["body"])
    assert stored["pid"] == worker.pid, "the worker should have finished the run"
    committed = {name: value["x"] for name, value in stored["steps"].items()}

    effects = read_effects(tmp_path)
    mine = [e for e in effects.executions if e.job == job]
    ended = Counter(e.step for e in mine if e.outcome == "ok")
    assert ended == {"one": 1, "two": 1, "three": 1}, (
        "a step ran to completion more than once:\n  "
        + "\n  ".join(
            f"{e.step} pid={e.pid}{' (stalled web)' if e.pid == web_pid else ''}"
            f" outcome={e.outcome}"
            for e in mine
        )
    )
    check_committed_not_rerun(effects, job, committed)
    check_no_overlap(mine, {})

    # The client that followed the redirect got the run's final response.
    assert response.status_code == 200, (response.status_code, response.text)
    assert response.json() == stored


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


@pytest.mark.postgres
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
