"""``flask durable ...``: the command group and the worker."""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path

import pytest
from procs import VENV_BIN, ProcessManager, app_env, wait_for


def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'durable.sqlite3'}"


def test_group_lists_the_worker(tmp_path: Path) -> None:
    out = subprocess.run(
        [str(VENV_BIN / "flask"), "--app", "procs.app", "durable", "--help"],
        env=app_env(tmp_path, sqlite_url(tmp_path)),
        cwd=str(Path(__file__).parent),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert "worker" in out.stdout


@pytest.mark.slow
def test_worker_resumes_runs_and_stops_on_sigterm(
    procs: ProcessManager, tmp_path: Path
) -> None:
    # A web process without a scheduler starts a run whose first attempt
    # fails; only the worker can retry it.
    env = app_env(tmp_path, sqlite_url(tmp_path), DURABLE_SCHEDULER="0")
    web = procs.serve("web", env)
    web.wait_healthy()
    worker = procs.worker("worker", env)
    wait_for(lambda: "worker for" in worker.output(), 30, "the worker to start")
    r = web.post("/work", json={"job": "cli"}, allow_redirects=False, timeout=30)
    assert r.status_code == 303
    final = web.get(r.headers["Location"], timeout=60)
    assert final.status_code == 200, final.text
    assert final.json()["job"] == "cli"
    worker.popen.send_signal(signal.SIGTERM)
    assert worker.popen.wait(30) == 0
    assert "flask-durable worker stopped" in worker.output()
