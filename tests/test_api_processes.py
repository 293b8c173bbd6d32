"""A retry asked of one process's API is executed by whichever process
claims the run: here a worker process, since the server runs no
scheduler. Real processes, on SQLite and PostgreSQL."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import requests
from procs import ProcessManager, app_env, read_effects, wait_for

pytestmark = pytest.mark.slow


@pytest.mark.parametrize(
    "backend", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]
)
def test_retry_from_api_runs_in_the_claiming_process(
    procs: ProcessManager,
    tmp_path: Path,
    request: pytest.FixtureRequest,
    backend: str,
) -> None:
    db = (
        f"sqlite:///{tmp_path / 'durable.sqlite3'}"
        if backend == "sqlite"
        else request.getfixturevalue("pg_url")
    )
    env = app_env(tmp_path, db)
    server = procs.serve("server", dict(env, DURABLE_SCHEDULER="0"))
    server_pid = server.wait_healthy()["pid"]
    (tmp_path / "broken").touch()

    # Without a scheduler here, the failed run's final response is written
    # by the request itself.
    r = requests.post(server.url + "/flaky", json={"job": "j"}, timeout=30)
    assert r.status_code == 500, r.text
    run_id = r.headers["Durable-Run-Id"]

    api = requests.Session()
    api.headers["X-Admin"] = "yes"
    base = server.url + "/durable/api"
    assert api.get(f"{base}/runs/{run_id}", timeout=10).json()["status"] == "failed"
    token = api.get(f"{base}/csrf", timeout=10).json()["csrf_token"]
    api.headers["X-CSRF-Token"] = token

    worker = procs.worker("worker", env)
    wait_for(
        lambda: "flask-durable worker for" in worker.output() or not worker.alive(),
        30,
        "the worker to start",
    )
    assert worker.alive(), worker.output()
    (tmp_path / "broken").unlink()
    r = api.post(f"{base}/runs/{run_id}/retry", timeout=10)
    assert r.status_code == 202, r.text

    def finished() -> dict[str, Any] | None:
        run = api.get(f"{base}/runs/{run_id}", timeout=10).json()
        return run if run["status"] == "completed" else None

    run = wait_for(finished, 30, "the retried run to complete")
    body = json.loads(run["response"]["body"])
    assert body["pid"] == worker.pid
    effects = read_effects(tmp_path)
    a = [e for e in effects.executions if e.step == "a"]
    b = [e for e in effects.executions if e.step == "b"]
    # Step a stayed memoized: it ran once, in the server; b ran in the worker.
    assert [(e.pid, e.outcome) for e in a] == [(server_pid, "ok")]
    assert [(e.pid, e.outcome) for e in b] == [(worker.pid, "ok")]
    steps = {s["id"]: s for s in run["steps"]}
    assert steps["b"]["attempt_errors"][0]["message"] == "b is broken"
