from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import requests
from flask import Flask
from werkzeug.serving import make_server

from flask_durable import Durable

FAST_CONFIG: dict[str, Any] = {
    "DURABLE_RETRY_BACKOFF": 0.05,
    "DURABLE_RETRY_BACKOFF_MAX": 0.2,
    "DURABLE_POLL_INTERVAL": 0.2,
    "DURABLE_WAIT_TIMEOUT": 10,
    "DURABLE_LEASE_SECONDS": 3,
}

POSTGRES_URL = os.environ.get("DURABLE_TEST_POSTGRES_URL")
PG_SKIP = (
    "PostgreSQL tests need a server: run them with"
    " DURABLE_TEST_POSTGRES_URL=postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
    " make test (.ci/run starts the local server and sets it)"
)


def pytest_report_header() -> str:
    if POSTGRES_URL:
        return f"PostgreSQL tests: on ({POSTGRES_URL})"
    return "PostgreSQL tests: SKIPPED. " + PG_SKIP


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """Say in one line, even with ``-q``, why tests were skipped and how to
    run them."""
    reasons: dict[str, int] = {}
    for report in terminalreporter.stats.get("skipped", []):
        if isinstance(report.longrepr, tuple):
            reason = report.longrepr[2].removeprefix("Skipped: ")
            reasons[reason] = reasons.get(reason, 0) + 1
    for reason, count in sorted(reasons.items(), key=lambda kv: -kv[1]):
        terminalreporter.write_line(f"{count} skipped: {reason}")


def _durable_threads() -> set[threading.Thread]:
    return {
        t
        for t in threading.enumerate()
        if t.name.startswith(("durable-", "APScheduler"))
        or "ThreadPoolExecutor" in t.name
    }


@pytest.fixture(autouse=True)
def no_leftovers() -> Iterator[None]:
    """Fail a test that leaves scheduler threads or pushed contexts behind."""
    before = _durable_threads()
    yield
    from flask.globals import _cv_app, _cv_request

    assert _cv_app.get(None) is None, "an app context was left pushed"
    assert _cv_request.get(None) is None, "a request context was left pushed"
    for _ in range(50):
        left = _durable_threads() - before
        if not left:
            break
        threading.Event().wait(0.1)
    assert not left, f"threads left behind: {left}"


def _postgres_schema_url(name: str) -> Iterator[str]:
    """A fresh PostgreSQL schema, used through ``search_path``."""
    import sqlalchemy as sa

    assert POSTGRES_URL is not None
    engine = sa.create_engine(POSTGRES_URL, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.exec_driver_sql(f'CREATE SCHEMA "{name}"')
    try:
        sep = "&" if "?" in POSTGRES_URL else "?"
        yield f"{POSTGRES_URL}{sep}options=-csearch_path%3D{name}"
    finally:
        for attempt in range(3):  # a test may have restarted PostgreSQL
            try:
                with engine.connect() as conn:
                    conn.exec_driver_sql(f'DROP SCHEMA IF EXISTS "{name}" CASCADE')
                break
            except sa.exc.OperationalError:
                engine.dispose()
                if attempt == 2:
                    raise
                threading.Event().wait(1.0)
        engine.dispose()


@pytest.fixture(
    params=[
        "sqlite",
        pytest.param("postgres", marks=pytest.mark.postgres),
    ]
)
def any_db_url(request: Any, tmp_path: Any) -> Iterator[str]:
    """A database URL for each tested backend (PostgreSQL when
    ``DURABLE_TEST_POSTGRES_URL`` is set)."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'durable.sqlite3'}"
        return
    if not POSTGRES_URL:
        pytest.skip(PG_SKIP)
    import uuid

    yield from _postgres_schema_url(f"t_{uuid.uuid4().hex[:12]}")


@pytest.fixture
def db_url(tmp_path: Any) -> str:
    return f"sqlite:///{tmp_path / 'durable.sqlite3'}"


@pytest.fixture
def make_app(db_url: str, tmp_path: Any) -> Iterator[Callable[..., Flask]]:
    """Build apps with flask-durable; shut them all down afterwards."""
    apps: list[Flask] = []

    def factory(extension: Durable | None = None, **config: Any) -> Flask:
        app = Flask("durable_test", instance_path=str(tmp_path / "instance"))
        app.config.update(
            SECRET_KEY="test-secret", DURABLE_DATABASE_URI=db_url, **FAST_CONFIG
        )
        app.config.update(config)
        (extension or Durable()).init_app(app)
        apps.append(app)
        return app

    yield factory
    for app in apps:
        app.extensions["durable"].close()


class LiveServer:
    def __init__(self, app: Flask) -> None:
        self.app = app
        self.server = make_server("127.0.0.1", 0, app, threaded=True)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        self.thread = threading.Thread(
            target=self.server.serve_forever, name="durable-test-server", daemon=True
        )
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)

    def get(self, path: str, **kw: Any) -> requests.Response:
        kw.setdefault("timeout", 30)
        return requests.get(self.url + path, **kw)

    def post(self, path: str, **kw: Any) -> requests.Response:
        kw.setdefault("timeout", 30)
        return requests.post(self.url + path, **kw)

    def request(self, method: str, path: str, **kw: Any) -> requests.Response:
        kw.setdefault("timeout", 30)
        return requests.request(method, self.url + path, **kw)


@pytest.fixture
def live_server() -> Iterator[Callable[[Flask], LiveServer]]:
    """Serve an app on loopback with a real threaded server."""
    servers: list[LiveServer] = []

    def start(app: Flask) -> LiveServer:
        server = LiveServer(app)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


# -- multi-process tests (tests/test_recovery_processes.py, test_servers.py) --


@pytest.fixture
def procs(tmp_path: Any) -> Iterator[Any]:
    """Start real child processes; every one of them (with its process
    group) is SIGKILLed at teardown, even when the test failed."""
    from procs import ProcessManager

    manager = ProcessManager(tmp_path)
    try:
        yield manager
    finally:
        manager.kill_all()


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A fresh PostgreSQL database for this test, dropped afterwards.
    Skips when DURABLE_TEST_POSTGRES_URL is not set."""
    from procs import create_database, drop_database

    if not POSTGRES_URL:
        pytest.skip(PG_SKIP)
    url = create_database(POSTGRES_URL)
    try:
        yield url
    finally:
        drop_database(url)
