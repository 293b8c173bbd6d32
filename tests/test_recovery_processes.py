"""Real processes, real SIGKILL, real HTTP: crash recovery on SQLite,
several processes claiming the same due runs, and the Werkzeug reloader.

The app under test is :mod:`procs.app`, run in child processes. Every step
execution is recorded in a log file the children append to (``O_APPEND``),
which no retry can fake: the assertions count executions there and compare
them with the results the runs stored.
"""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import requests
from procs import (
    VENV_BIN,
    ProcessManager,
    app_env,
    check_job,
    check_no_overlap,
    children_of,
    free_port,
    read_effects,
    thread_count,
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


# -- 5. The Werkzeug development server with the reloader ------------------


def _apscheduler_threads(health: dict[str, Any]) -> int:
    return sum(1 for name in health["threads"] if name == "APScheduler")


def test_reloader_scheduler_only_in_serving_child(
    procs: ProcessManager, tmp_path: Path
) -> None:
    trigger = tmp_path / "reload-trigger.txt"
    trigger.write_text("0")
    port = free_port()
    env = app_env(tmp_path, sqlite_url(tmp_path))
    env.pop("FLASK_DEBUG", None)
    parent = procs.start(
        "flask-run-reload",
        [
            str(VENV_BIN / "flask"),
            "--app",
            "procs.app",
            "run",
            "--reload",
            "--no-debugger",
            "--port",
            str(port),
            "--extra-files",
            str(trigger),
        ],
        env,
        url=f"http://127.0.0.1:{port}",
    )

    def check_generation(generation: int) -> int:
        health = parent.wait_healthy()
        child = health["pid"]
        assert child != parent.pid
        assert health["ppid"] == parent.pid
        assert children_of(parent.pid) == [child]
        # A retried run: its first attempt runs in the request, its retry
        # in the scheduler of the serving child.
        job = f"reload-{generation}"
        r = parent.post("/work", json={"job": job}, timeout=60)
        assert r.status_code == 200, r.text
        assert r.json()["pid"] == child
        effects = read_effects(tmp_path)
        mine = [e for e in effects.executions if e.job == job]
        assert [(e.step, e.attempt, e.pid) for e in mine] == [
            ("a", 0, child),
            ("a", 1, child),
            ("b", 0, child),
            ("c", 0, child),
        ]
        # The scheduler started exactly once in the child, never in the
        # reloader's parent (which has only its main thread).
        for _ in range(3):
            health = parent.get("/health").json()
            assert health["pid"] == child
            assert _apscheduler_threads(health) == 1, health["threads"]
        assert thread_count(parent.pid) == 1
        return child

    first_child = check_generation(1)
    # A reload replaces the child; the new one starts its own scheduler.
    time.sleep(1.1)  # the stat reloader compares mtimes at 1 s resolution
    trigger.write_text("1")
    wait_for(
        lambda: parent.get("/health", timeout=5).json()["pid"] != first_child,
        30,
        "the reloader to restart the child",
        interval=0.2,
    )
    second_child = check_generation(2)
    assert second_child != first_child


def test_waitress_serves_and_resumes(procs: ProcessManager, tmp_path: Path) -> None:
    port = free_port()
    server = procs.start(
        "waitress",
        [
            str(VENV_BIN / "waitress-serve"),
            "--listen",
            f"127.0.0.1:{port}",
            "--threads",
            "4",
            "procs.app:app",
        ],
        app_env(tmp_path, sqlite_url(tmp_path)),
        url=f"http://127.0.0.1:{port}",
    )
    health = server.wait_healthy()
    # A retried run: the first attempt of "a" fails in the request, the
    # client follows the 303 and gets the response of the replay.
    r = server.post("/work", json={"job": "waitress"}, timeout=60)
    assert r.status_code == 200, r.text
    assert r.history and r.history[0].status_code == 303
    mine = [e for e in read_effects(tmp_path).executions if e.job == "waitress"]
    assert [(e.step, e.attempt, e.pid) for e in mine] == [
        ("a", 0, health["pid"]),
        ("a", 1, health["pid"]),
        ("b", 0, health["pid"]),
        ("c", 0, health["pid"]),
    ]
