"""Helpers for the multi-process tests: starting and killing real processes,
reading the side-effect log the child apps write, PostgreSQL databases.

The child app is :mod:`procs.app`; it is configured through environment
variables (see :func:`app_env`) and appends one JSON line per step execution
event to ``$DURABLE_TEST_DIR/effects.log`` with ``O_APPEND``.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import requests

TESTS_DIR = Path(__file__).resolve().parent.parent
ROOT = TESTS_DIR.parent
VENV_BIN = Path(sys.executable).parent
EFFECTS = "effects.log"

T = TypeVar("T")


# -- waiting ------------------------------------------------------------------


def wait_for(
    predicate: Callable[[], T | None],
    timeout: float,
    what: str,
    interval: float = 0.05,
) -> T:
    """Poll ``predicate`` until it returns something truthy; fail after
    ``timeout`` seconds with a message naming ``what``."""
    deadline = time.monotonic() + timeout
    last_error: BaseException | None = None
    while True:
        try:
            value = predicate()
        except Exception as e:
            last_error = e
            value = None
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(
                f"timed out after {timeout}s waiting for {what}"
                + (f" (last error: {last_error!r})" if last_error else "")
            )
        time.sleep(interval)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- processes ----------------------------------------------------------------


def app_env(test_dir: Path, db_url: str, **extra: Any) -> dict[str, str]:
    """The environment of a child process running :mod:`procs.app`."""
    env = dict(os.environ)
    env.pop("WERKZEUG_RUN_MAIN", None)
    env.pop("WERKZEUG_SERVER_FD", None)
    env.update(
        PYTHONPATH=os.pathsep.join([str(TESTS_DIR), str(ROOT)]),
        PYTHONUNBUFFERED="1",
        DURABLE_TEST_DIR=str(test_dir),
        DURABLE_TEST_DB=db_url,
    )
    env.update({k: str(v) for k, v in extra.items()})
    return env


@dataclass
class Proc:
    """A child process started in its own session (so that its whole
    process group, e.g. gunicorn's workers, can be killed at once)."""

    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path
    url: str | None = None

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def output(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def kill(self) -> None:
        """SIGKILL the process and everything in its process group."""
        try:
            os.killpg(self.popen.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            self.popen.kill()
        except ProcessLookupError:
            pass
        try:
            self.popen.wait(10)
        except subprocess.TimeoutExpired:
            pass

    def get(self, path: str, **kw: Any) -> requests.Response:
        assert self.url is not None
        kw.setdefault("timeout", 30)
        return requests.get(self.url + path, **kw)

    def post(self, path: str, **kw: Any) -> requests.Response:
        assert self.url is not None
        kw.setdefault("timeout", 30)
        return requests.post(self.url + path, **kw)

    def wait_healthy(self, timeout: float = 30) -> dict[str, Any]:
        """Wait until ``GET /health`` answers (this also starts the
        scheduler of the process that answers it: it starts lazily)."""

        def ready() -> dict[str, Any] | None:
            if not self.alive():
                raise AssertionError(
                    f"{self.name} exited with {self.popen.returncode}:\n"
                    + self.output()[-3000:]
                )
            try:
                r = self.get("/health", timeout=5)
            except requests.RequestException:
                return None
            return r.json() if r.status_code == 200 else None

        try:
            return wait_for(ready, timeout, f"{self.name} to answer /health")
        except AssertionError as e:
            raise AssertionError(
                f"{e}\n--- {self.name} output ---\n{self.output()[-3000:]}"
            ) from None


class ProcessManager:
    """Starts child processes and kills every one of them (and their process
    groups) at teardown, whatever happened in the test."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.procs: list[Proc] = []

    def start(
        self,
        name: str,
        args: list[str],
        env: Mapping[str, str],
        url: str | None = None,
    ) -> Proc:
        log_path = self.directory / f"{name}-{len(self.procs)}.out"
        out = open(log_path, "wb")
        try:
            popen = subprocess.Popen(
                args,
                cwd=str(self.directory),
                env=dict(env),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        finally:
            out.close()
        proc = Proc(name, popen, log_path, url)
        self.procs.append(proc)
        return proc

    def serve(self, name: str, env: Mapping[str, str], port: int | None = None) -> Proc:
        """The app on Werkzeug's threaded server (:mod:`procs.serve`)."""
        port = port or free_port()
        env = dict(env, DURABLE_TEST_PORT=str(port))
        return self.start(
            name,
            [sys.executable, "-m", "procs.serve"],
            env,
            url=f"http://127.0.0.1:{port}",
        )

    def worker(self, name: str, env: Mapping[str, str]) -> Proc:
        """``flask --app procs.app durable worker``."""
        return self.start(
            name,
            [str(VENV_BIN / "flask"), "--app", "procs.app", "durable", "worker"],
            env,
        )

    def kill_all(self) -> None:
        for proc in self.procs:
            proc.kill()

    def dump(self) -> str:
        """Output of every process, for failure messages."""
        return "\n".join(
            f"--- {p.name} (pid {p.pid}, rc {p.popen.returncode}) ---\n"
            + p.output()[-4000:]
            for p in self.procs
        )


def children_of(pid: int) -> list[int]:
    """Pids of the live processes whose parent is ``pid``."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        # The command name is in parentheses and may contain spaces.
        fields = stat[stat.rindex(")") + 2 :].split()
        if int(fields[1]) == pid and fields[0] != "Z":
            found.append(int(entry))
    return sorted(found)


def thread_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/task"))


# -- the side-effect log -------------------------------------------------------


@dataclass
class Execution:
    """One execution of one step function (one attempt)."""

    job: str
    run: str
    step: str
    attempt: int
    pid: int
    x: str
    start: float
    end: float | None = None
    outcome: str | None = None


@dataclass
class Effects:
    """The parsed side-effect log."""

    executions: list[Execution] = field(default_factory=list)

    def by_job(self) -> dict[str, list[Execution]]:
        jobs: dict[str, list[Execution]] = defaultdict(list)
        for e in self.executions:
            jobs[e.job].append(e)
        return jobs

    def count(self, job: str, step: str) -> int:
        return sum(1 for e in self.executions if e.job == job and e.step == step)

    def ended(self, step: str) -> set[str]:
        """Jobs for which an execution of ``step`` ended successfully."""
        return {e.job for e in self.executions if e.step == step and e.outcome == "ok"}


def read_effects(test_dir: Path) -> Effects:
    path = test_dir / EFFECTS
    executions: dict[str, Execution] = {}
    if not path.exists():
        return Effects()
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        rec = json.loads(line)
        if rec["ev"] == "start":
            executions[rec["x"]] = Execution(
                job=rec["job"],
                run=rec["run"],
                step=rec["step"],
                attempt=rec["attempt"],
                pid=rec["pid"],
                x=rec["x"],
                start=rec["t"],
            )
        else:
            e = executions[rec["x"]]
            e.end = rec["t"]
            e.outcome = rec["outcome"]
    return Effects(list(executions.values()))


def check_no_overlap(
    executions: Iterable[Execution], killed: Mapping[int, float]
) -> None:
    """Fail if two executions of one run's steps overlap in time (a run
    executing in two places at once).

    An execution that never ended must have been in a killed process
    (``killed`` maps pid -> time of the SIGKILL); it lasted until then.
    """
    by_run: dict[str, list[tuple[float, float, Execution]]] = defaultdict(list)
    for e in executions:
        if e.end is None:
            assert e.pid in killed, (
                f"execution {e} never ended but its process {e.pid} was not killed"
            )
            end = killed[e.pid]
        else:
            end = e.end
        by_run[e.job].append((e.start, end, e))
    for job, spans in by_run.items():
        spans.sort(key=lambda s: s[0])
        for (_, end1, e1), (start2, _, e2) in zip(spans, spans[1:], strict=False):
            assert start2 >= end1, (
                f"job {job}: two executions overlap (the run executed in two"
                f" places at once):\n  {e1}\n  {e2}"
            )


def check_committed_not_rerun(
    effects: Effects, job: str, committed: Mapping[str, str]
) -> None:
    """``committed`` maps step -> execution id whose result the run stored.
    Fail if a step started again after its committed execution ended."""
    mine = [e for e in effects.executions if e.job == job]
    by_x = {e.x: e for e in mine}
    for step, x in committed.items():
        assert x in by_x, f"job {job}: committed execution {x} of {step} not logged"
        done = by_x[x]
        assert done.end is not None and done.outcome == "ok", done
        later = [e for e in mine if e.step == step and e.start > done.end]
        assert not later, (
            f"job {job}: step {step!r} ran again after its result was committed:"
            f" committed {done}, re-run {later}"
        )


# -- PostgreSQL -----------------------------------------------------------------


def postgres_url() -> str | None:
    return os.environ.get("DURABLE_TEST_POSTGRES_URL") or None


def _admin_conninfo(url: str) -> tuple[Any, str]:
    import sqlalchemy as sa

    u = sa.engine.make_url(url)
    return u, u.set(drivername="postgresql").render_as_string(hide_password=False)


def create_database(url: str) -> str:
    """Create ``durable_test_<random>`` on the server of ``url``; return its
    SQLAlchemy URL."""
    import psycopg

    u, conninfo = _admin_conninfo(url)
    name = f"durable_test_{secrets.token_hex(6)}"
    with psycopg.connect(conninfo, autocommit=True, connect_timeout=10) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return u.set(database=name).render_as_string(hide_password=False)


def drop_database(url: str) -> None:
    import psycopg

    u, _ = _admin_conninfo(url)
    name = u.database
    _, conninfo = _admin_conninfo(u.set(database="postgres").render_as_string(False))
    for attempt in range(20):
        try:
            with psycopg.connect(conninfo, autocommit=True, connect_timeout=10) as conn:
                conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            return
        except psycopg.OperationalError:
            if attempt == 19:
                raise
            time.sleep(0.5)


def pg_cluster() -> tuple[str, str] | None:
    """``(version, name)`` of the local cluster pg_ctlcluster manages."""
    if shutil.which("pg_ctlcluster") is None or not os.path.isdir("/etc/postgresql"):
        return None
    for version in sorted(os.listdir("/etc/postgresql"), reverse=True):
        if os.path.isdir(f"/etc/postgresql/{version}/main"):
            return version, "main"
    return None


def pg_isready(url: str) -> bool:
    u, _ = _admin_conninfo(url)
    args = ["pg_isready", "-h", u.host or "127.0.0.1", "-p", str(u.port or 5432)]
    return subprocess.run(args, capture_output=True).returncode == 0


def check_job(
    effects: Effects,
    job: str,
    committed: Mapping[str, str],
    killed: Iterable[int] = (),
    designed_failures: Mapping[str, int] | None = None,
) -> None:
    """Check the executions of one run's steps against its stored result.

    ``committed`` maps each step to the execution id whose value the run
    stored (taken from the final response). ``designed_failures`` says how
    many attempts of a step fail on purpose. Besides those, a step may only
    have run more than once in a process that was SIGKILLed (``killed``):
    an execution interrupted by the kill, or one that finished but was not
    committed yet. With no execution in a killed process, the counts are
    exact.
    """
    killed = set(killed)
    designed_failures = designed_failures or {}
    check_committed_not_rerun(effects, job, committed)
    mine = [e for e in effects.executions if e.job == job]
    touched_by_kill = any(e.pid in killed for e in mine)
    for step, x in committed.items():
        runs = [e for e in mine if e.step == step]
        others = [e for e in runs if e.x != x and e.pid not in killed]
        failures = designed_failures.get(step, 0)
        assert all(e.outcome == "error" for e in others), (
            f"job {job}: step {step!r} ran again outside a killed process: {others}"
        )
        assert len(others) <= failures, (
            f"job {job}: step {step!r} failed {len(others)} times, designed {failures}"
        )
        if not touched_by_kill:
            assert len(runs) == failures + 1, (
                f"job {job}: step {step!r} ran {len(runs)} times, expected"
                f" {failures + 1}: {runs}"
            )
