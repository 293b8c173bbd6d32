"""``examples/gunicorn``: the ``gunicorn.conf.py`` that the deployment docs
include, run by a real gunicorn against the docs' app shape (a module-level
``durable`` and ``create_app()``).

Its ``post_worker_init`` hook must start the scheduler of each worker when
the worker boots: a run that falls due is resumed although no request ever
reaches the server. Without the hook nothing would resume it (a worker
starts its scheduler lazily, on its first request).
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from procs import VENV_BIN, ProcessManager, free_port, wait_for

from flask_durable import Durable

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "gunicorn"
CONF = EXAMPLE / "gunicorn.conf.py"
APP_ID = "gunicorn-example"

pytestmark = pytest.mark.slow

SEED = """
from app import create_app, durable

app = create_app()
r = app.test_client().post("/remind", json={"to": "ops@example.com", "delay": "2s"})
assert r.status_code == 303, r.status_code
with app.app_context():
    durable.shutdown()
print(r.headers["Durable-Run-Id"])
"""


def example_env(database: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLASK_")}
    env.update(
        PYTHONPATH=str(EXAMPLE),
        PYTHONUNBUFFERED="1",
        FLASK_SECRET_KEY="gunicorn-example-secret",
        FLASK_DURABLE_DATABASE_URI=f"sqlite:///{database}",
        FLASK_DURABLE_APP_ID=APP_ID,
        FLASK_DURABLE_POLL_INTERVAL="0.2",
    )
    return env


@pytest.fixture
def probe(tmp_path: Path) -> Iterator[tuple[Flask, Durable]]:
    """An app on the example's database, to read its runs (it starts no
    threads and claims no runs)."""
    (tmp_path / "db").mkdir()
    app = Flask("probe")
    app.config.update(
        SECRET_KEY="gunicorn-example-secret",
        DURABLE_DATABASE_URI=f"sqlite:///{tmp_path / 'db' / 'durable.sqlite3'}",
        DURABLE_APP_ID=APP_ID,
    )
    durable = Durable(app)
    yield app, durable
    app.extensions["durable"].close()


def gunicorn(procs: ProcessManager, env: dict[str, str], *extra: str) -> Any:
    port = free_port()
    args = [
        str(VENV_BIN / "gunicorn"),
        *("--config", str(CONF), "--bind", f"127.0.0.1:{port}"),
        *("--workers", "2", "--threads", "2", "--no-control-socket", *extra),
        "app:create_app()",
    ]
    return procs.start("gunicorn", args, env, url=f"http://127.0.0.1:{port}")


def worker_lines(server: Any, text: str) -> set[str]:
    """The pids of the workers that logged ``text``."""
    return {
        line.split("] [", 2)[1]
        for line in server.output().splitlines()
        if text in line and "] [" in line
    }


@pytest.mark.parametrize("preload", [False, True], ids=["", "preload"])
def test_the_hook_starts_each_workers_scheduler(
    procs: ProcessManager,
    tmp_path: Path,
    probe: tuple[Flask, Durable],
    preload: bool,
) -> None:
    env = example_env(tmp_path / "db" / "durable.sqlite3")
    seeded = subprocess.run(
        [sys.executable, "-c", SEED],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert seeded.returncode == 0, seeded.stdout + seeded.stderr
    run_id = seeded.stdout.split()[-1]

    server = gunicorn(procs, env, *(["--preload"] if preload else []))
    app, durable = probe

    def completed() -> Any:
        if not server.alive():
            return "gunicorn exited"
        with app.app_context():
            run = durable.get_run(run_id)
        return run if run is not None and run.status == "completed" else None

    # No request reaches the server: only a started scheduler resumes it.
    run = wait_for(completed, 30, "the sleeping run to be resumed")
    assert server.alive(), server.output()
    assert run.response is not None and run.response[0] == 200
    assert b'"sent_to":"ops@example.com"' in run.response[2].replace(b" ", b"")
    wait_for(
        lambda: len(worker_lines(server, "scheduler started")) == 2,
        30,
        "both workers to log that the scheduler started",
    )
    assert "Worker failed to boot" not in server.output()


def test_workers_boot_while_the_database_is_unavailable(
    procs: ProcessManager, tmp_path: Path
) -> None:
    """The hook cannot use the database (another process holds an exclusive
    lock on it): the workers boot all the same, and start their scheduler
    on their first request once the database is back."""
    database = tmp_path / "durable.sqlite3"
    env = dict(
        example_env(database),
        FLASK_DURABLE_SQLITE_BUSY_TIMEOUT="0.2",
        FLASK_DURABLE_ENGINE_OPTIONS='{"connect_args": {"timeout": 0.2}}',
    )
    lock = sqlite3.connect(database, isolation_level=None)
    try:
        lock.execute("BEGIN EXCLUSIVE")
        server = gunicorn(procs, env)
        wait_for(
            lambda: len(worker_lines(server, "scheduler not started")) == 2,
            30,
            "both workers to log that the scheduler was not started",
        )
        assert server.alive(), server.output()
        assert "Worker failed to boot" not in server.output()
    finally:
        lock.close()
    r = server.post("/remind", json={"to": "ops@example.com", "delay": "0.5s"})
    assert r.status_code == 200, r.text
    assert r.json() == {"sent_to": "ops@example.com"}
    assert r.history and r.history[0].status_code == 303
