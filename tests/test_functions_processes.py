"""Durable functions across real processes, on SQLite and PostgreSQL: events
sent to a server are executed by worker processes, a worker SIGKILLed in the
middle of a function has its run finished by another, and a cron tick starts
one run however many processes serve the function."""

from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import requests
from flask import Flask
from procs import (
    ProcessManager,
    app_env,
    check_committed_not_rerun,
    read_effects,
    wait_for,
)

from flask_durable import Durable
from flask_durable.functions import cron_key

pytestmark = pytest.mark.slow

BEARER = {"Authorization": "Bearer procs-event-key"}
ADMIN = {"X-Admin": "yes"}


def _db(tmp_path: Path, request: pytest.FixtureRequest, backend: str) -> str:
    if backend == "sqlite":
        return f"sqlite:///{tmp_path / 'durable.sqlite3'}"
    return str(request.getfixturevalue("pg_url"))


def _started(worker: Any) -> None:
    wait_for(
        lambda: "flask-durable worker for" in worker.output() or not worker.alive(),
        30,
        f"{worker.name} to start",
    )
    assert worker.alive(), worker.output()


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


BACKENDS = ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]


@pytest.mark.parametrize("backend", BACKENDS)
def test_sigkilled_worker_and_fan_out(
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
        _started(w)

    # One function run blocks inside step two; its worker is SIGKILLed.
    (tmp_path / "hold").touch()
    r = requests.post(
        server.url + "/durable/events",
        json={"name": "job/go", "data": {"job": "killed", "block": True}},
        headers=BEARER,
        timeout=10,
    )
    assert r.status_code == 202, r.text
    wait_for(lambda: (tmp_path / "inside-killed").exists(), 30, "step two to start")
    holder = next(
        e.pid
        for e in read_effects(tmp_path).executions
        if e.job == "killed" and e.step == "two"
    )
    victim = next(w for w in workers if w.pid == holder)
    victim.kill()
    (tmp_path / "hold").unlink()

    # Twenty more events, one of them sent twice: each starts one run.
    events = [
        {"name": "job/go", "data": {"job": f"j{i}"}, "id": f"e{i}"} for i in range(20)
    ]
    r = requests.post(
        server.url + "/durable/events",
        json=events + [events[3]],
        headers=BEARER,
        timeout=10,
    )
    assert r.status_code == 202, r.text

    def all_done() -> list[dict[str, Any]] | None:
        runs = _runs(server, "fn-work")
        done = [r for r in runs if r["status"] == "completed"]
        return runs if len(runs) == 21 and len(done) == 21 else None

    wait_for(all_done, 60, "every function run to complete")
    effects = read_effects(tmp_path)
    survivor = next(w for w in workers if w is not victim)
    for run in _runs(server, "fn-work"):
        info = requests.get(
            f"{server.url}/durable/api/runs/{run['id']}", headers=ADMIN, timeout=10
        ).json()
        body = json.loads(info["response"]["body"])
        committed = {name: value["x"] for name, value in body["steps"].items()}
        check_committed_not_rerun(effects, body["job"], committed)
        assert info["steps"] and [s["id"] for s in info["steps"]] == [
            "one",
            "two",
            "three",
        ]
    counts = Counter((e.job, e.step) for e in effects.executions)
    # The killed run: step one once, step two twice (cut, then redone).
    assert counts[("killed", "one")] == 1
    assert counts[("killed", "two")] == 2
    assert counts[("killed", "three")] == 1
    redone = [e for e in effects.executions if e.job == "killed" and e.step == "two"]
    assert redone[-1].pid == survivor.pid and redone[-1].outcome == "ok"
    for i in range(20):
        assert counts[(f"j{i}", "one")] == 1, (i, counts)
        assert counts[(f"j{i}", "three")] == 1, (i, counts)


@pytest.mark.parametrize("backend", BACKENDS)
def test_cron_tick_runs_once_across_processes(
    procs: ProcessManager,
    tmp_path: Path,
    request: pytest.FixtureRequest,
    backend: str,
) -> None:
    db = _db(tmp_path, request, backend)
    # The function has been served for two and a half minutes: the processes
    # catch up the two or three ticks since, each exactly once.
    app = Flask("procs.app")
    app.config.update(SECRET_KEY="procs-secret", DURABLE_DATABASE_URI=db)
    Durable(app)
    lifecycle = app.extensions["durable"]
    try:
        lifecycle.ensure_schema()
        key = cron_key("procs.app", "fn-tick", "* * * * *", None)
        lifecycle.store.meta_value(key, str(time.time() - 150))
    finally:
        lifecycle.close()

    env = app_env(tmp_path, db, DURABLE_TEST_CRON="1")
    workers = [procs.worker(f"worker{i}", env) for i in range(3)]
    for w in workers:
        _started(w)
    server = procs.serve("server", dict(env, DURABLE_SCHEDULER="0"))
    server.wait_healthy()

    def ticks() -> list[dict[str, Any]] | None:
        runs = _runs(server, "fn-tick")
        done = [r for r in runs if r["status"] == "completed"]
        return runs if len(runs) >= 2 and len(done) == len(runs) else None

    runs = wait_for(ticks, 30, "the missed ticks to run")
    time.sleep(1.0)  # every process has fired its catch-up by now
    runs = _runs(server, "fn-tick")
    assert 2 <= len(runs) <= 4
    lines = (tmp_path / "ticks.log").read_text().splitlines()
    logged = Counter(json.loads(line)["tick"] for line in lines)
    assert len(logged) == len(runs)
    assert set(logged.values()) == {1}, logged
