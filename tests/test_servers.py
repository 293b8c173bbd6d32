"""Real servers: gunicorn on PostgreSQL (gthread with and without
``--preload``, sync) with a worker SIGKILLed mid-load, the Werkzeug
development server with the reloader, and waitress.

The gunicorn tests are skipped when ``DURABLE_TEST_POSTGRES_URL`` is not
set; each gets its own database (``durable_test_<random>``), dropped
afterwards.
"""

from __future__ import annotations

import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import requests
from procs import (
    VENV_BIN,
    Effects,
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


# -- 1. gunicorn, a worker SIGKILLed while runs execute --------------------


@pytest.mark.postgres
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


# -- 2. The Werkzeug development server with the reloader ------------------


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


# -- 3. waitress ---------------------------------------------------------


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
