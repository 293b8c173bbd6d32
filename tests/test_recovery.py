"""Recovery within one process, over real HTTP:

1. runs outlive the app instance that started them: timers lost with a
   process are found again by the sweeper of the next one;
2. a new run whose first step outlasts the lease must not be born with an
   expired lease (and be replayed beside the live request);
3. an unavailable database (SQLite locked, PostgreSQL refusing *new*
   connections, a pool that has none left) is a ``503`` with
   ``Retry-After``, never a ``500``, and a run being parked at that moment
   is neither lost in this process nor failed;
4. a run that just finished is never reported "lease lost".

Leases and fencing between two apps: tests/test_recovery_fencing.py; real
processes killed and racing: tests/test_recovery_processes.py.
"""

from __future__ import annotations

import logging
import re
import sqlite3
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import requests
import sqlalchemy as sa
from flask import Flask, jsonify
from procs import wait_for

from flask_durable import Durable, RetryAfterError, current_run, signals, step

durable = Durable()


def _final(
    get: Callable[..., requests.Response],
    first: requests.Response,
    deadline: float,
) -> requests.Response:
    """Follow a ``202`` (``Prefer: respond-async``) to the wait URL until
    the run's final response comes, or the deadline passes."""
    response = first
    while response.status_code == 202 and time.monotonic() < deadline:
        response = get(
            response.headers["Location"],
            headers={"Prefer": "respond-async"},
            allow_redirects=False,
        )
    return response


def _retry_with_key(
    server: Any, app: Flask, path: str, key: str, run_id: str, deadline: float
) -> requests.Response | None:
    """What a client does after a ``503``: repeat its request with the same
    ``Idempotency-Key`` (following ``202`` to the wait URL) until the run's
    final response comes. Gives up at the deadline, or when the run is
    terminal and the answer is still not its response."""
    last: requests.Response | None = None
    while time.monotonic() < deadline:
        r = server.post(
            path,
            headers={"Idempotency-Key": key, "Prefer": "respond-async"},
            allow_redirects=False,
        )
        if r.status_code not in (409, 503):
            r = _final(server.get, r, deadline)
        last = r
        if r.status_code not in (202, 409, 503):
            return r
        try:
            with app.app_context():
                info = durable.get_run(run_id)
        except Exception:
            info = None
        if info is not None and info.is_terminal:
            return r  # a stored 503: the run was given up
        time.sleep(0.2)
    return last


def _describe(response: requests.Response | None) -> str:
    if response is None:
        return "no answer"
    return f"{response.status_code} {response.text[:200]!r}"


# -- 1. Runs outlive the app instance that started them ---------------------


def routes(app: Flask) -> Flask:
    @app.post("/nap")
    @durable.endpoint
    def nap() -> Any:
        step.sleep("nap", "2s")
        return jsonify(woke=time.time())

    @app.before_request
    def guard() -> Any:
        if app.config.get("LOCKED") and durable.is_replay():
            return jsonify(error="locked"), 423
        return None

    return app


def test_server_restarted_during_sleep_wakes_on_time(
    make_app: Any, live_server: Any
) -> None:
    first = routes(make_app())
    server = live_server(first)
    r = server.post("/nap", allow_redirects=False)
    due = time.time() + 2
    location = r.headers["Location"]
    server.stop()
    first.extensions["durable"].close()  # the process is gone, timers too

    second = routes(make_app())
    server = live_server(second)
    final = server.get(location)
    assert final.status_code == 200
    woke = final.json()["woke"]
    assert woke >= due - 0.05
    assert woke <= due + 0.2 + 1.0  # poll interval + 1 s


def test_replay_answered_before_the_view_finishes_the_run(
    make_app: Any, live_server: Any
) -> None:
    app = routes(make_app())
    server = live_server(app)
    r = server.post("/nap", allow_redirects=False)
    app.config["LOCKED"] = True
    final = server.get(r.headers["Location"])
    assert final.status_code == 423
    assert final.json() == {"error": "locked"}
    run_id = r.headers["Durable-Run-Id"]
    assert final.headers["Durable-Run-Id"] == run_id
    with app.app_context():
        info = durable.get_run(run_id)
    assert info is not None and info.status == "failed"


# -- 2. A first step that outlasts the lease ----------------------------------


def test_first_step_longer_than_lease_runs_each_step_once(
    make_app: Any, live_server: Any, any_db_url: str
) -> None:
    # A run without Idempotency-Key is stored with its first checkpoint; its
    # lease must run from then (or be renewed), not from the request start.
    app = make_app(
        DURABLE_DATABASE_URI=any_db_url,
        DURABLE_LEASE_SECONDS=1.0,
        DURABLE_POLL_INTERVAL=0.01,
    )
    calls: Counter[str] = Counter()
    lock = threading.Lock()

    def effect(name: str, seconds: float) -> str:
        with lock:
            calls[name] += 1
        time.sleep(seconds)
        return name

    @app.post("/long")
    @durable.endpoint
    def long() -> Any:
        first = step.run("first", effect, "first", 2.5)  # 2.5 x the lease
        second = step.run("second", effect, "second", 0.5)
        return jsonify(first=first, second=second)

    server = live_server(app)
    r = server.post("/long", timeout=60)
    assert r.status_code == 200, r.text
    assert r.json() == {"first": "first", "second": "second"}
    run_id = r.headers["Durable-Run-Id"]
    # Let a replay that may have started beside the request run its course.
    with app.app_context():
        info = wait_for(
            lambda: (i := durable.get_run(run_id)) and i.is_terminal and i,
            20,
            "the run to be terminal",
        )
    time.sleep(0.5)
    assert info.status == "completed"
    assert calls == {"first": 1, "second": 1}, (
        f"steps ran more than once (the run was replayed beside the live"
        f" request): {dict(calls)}"
    )


# -- 3. An unavailable database --------------------------------------------


def test_locked_sqlite_is_503_then_recovers(
    make_app: Any, live_server: Any, db_url: str
) -> None:
    app = make_app(DURABLE_SQLITE_BUSY_TIMEOUT=0.2)
    calls: Counter[str] = Counter()

    @app.post("/go")
    @durable.endpoint
    def go() -> Any:
        return jsonify(v=step.run("one", lambda: calls.update(["one"]) or 1))

    @app.get("/plain")
    def plain() -> str:
        return "plain"

    server = live_server(app)
    assert server.post("/go").status_code == 200  # creates the tables
    locker = sqlite3.connect(db_url.removeprefix("sqlite:///"), isolation_level=None)
    locker.execute("BEGIN EXCLUSIVE")
    try:
        r = server.post("/go")
        assert r.status_code == 503
        assert r.headers["Retry-After"]
        assert "unavailable" in r.json()["error"]
        assert server.get("/plain").text == "plain"
    finally:
        locker.execute("ROLLBACK")
        locker.close()
    r = server.post("/go")
    assert r.status_code == 200
    assert r.json() == {"v": 1}


def _assert_503(response: requests.Response, what: str, problems: list[str]) -> None:
    """Record a problem unless ``response`` is the ``503`` of an unavailable
    store (JSON error, ``Retry-After``)."""
    ok = (
        response.status_code == 503
        and bool(response.headers.get("Retry-After"))
        and response.headers.get("Content-Type", "").startswith("application/json")
        and "error" in response.json()
    )
    if not ok:
        problems.append(
            f"{what}: expected 503 with a JSON error and Retry-After, got"
            f" {response.status_code} {response.headers.get('Content-Type')}"
            f" Retry-After={response.headers.get('Retry-After')!r}:"
            f" {response.text[:200]!r}"
        )


@pytest.mark.postgres
def test_postgres_refusing_connections_is_503_and_parked_run_recovers(
    pg_url: str, make_app: Any, live_server: Any
) -> None:
    import psycopg

    app = make_app(DURABLE_DATABASE_URI=pg_url, DURABLE_WAIT_TIMEOUT=1)
    state = app.extensions["durable"]
    name = sa.engine.make_url(pg_url).database
    admin_url = sa.engine.make_url(pg_url).set(
        drivername="postgresql", database="postgres"
    )
    admin = psycopg.connect(
        admin_url.render_as_string(hide_password=False), autocommit=True
    )
    calls: Counter[str] = Counter()
    seen: dict[str, str] = {}

    def cut_database() -> None:
        """New connections to the app's database are refused from now on;
        its open sessions are terminated."""
        admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false')
        admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE datname = %s AND pid <> pg_backend_pid()",
            (name,),
        )
        # The first use of a dead pooled connection recycles the pool (what
        # the scheduler's next sweep does by itself): from then on every use
        # opens a new connection, and that is refused.
        try:
            durable.get_run("0" * 32)
        except Exception:
            pass
        else:
            raise AssertionError("the database still answers")

    def restore_database() -> None:
        admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')

    def flaky() -> str:
        calls["flaky"] += 1
        seen["run"] = current_run.id
        if calls["flaky"] == 1:
            # The step fails and, while the run is being parked for its
            # retry, the database goes away.
            cut_database()
            raise ConnectionError("the provider hung up")
        return "paid"

    @app.post("/pay")
    @durable.endpoint
    def pay() -> Any:
        first = step.run("first", lambda: calls.update(["first"]) or 1)
        return jsonify(first=first, flaky=step.run("flaky", flaky))

    @app.post("/quick")
    @durable.endpoint
    def quick() -> Any:
        return jsonify(v=step.run("v", lambda: 1))

    server = live_server(app)
    problems: list[str] = []
    try:
        assert server.post("/quick").status_code == 200  # the database works
        r = server.post("/pay", headers={"Idempotency-Key": "pay-1"})
        _assert_503(r, "the request whose run was being parked", problems)
        run_id = seen["run"]
        if run_id in state.active:
            problems.append(
                f"run {run_id} is left in the process's active runs (its lease"
                " would be renewed forever)"
            )
        _assert_503(server.post("/quick"), "a new run without a key", problems)
        _assert_503(
            server.post("/quick", headers={"Idempotency-Key": "q-1"}),
            "a new run with a key",
            problems,
        )
    finally:
        restore_database()
        admin.close()

    # Once the database is back, the client's retry with the same key gets
    # the run's real response: the run was neither lost nor failed.
    final = _retry_with_key(server, app, "/pay", "pay-1", run_id, time.monotonic() + 40)
    if final is None or final.status_code != 200:
        problems.append(
            "the retry with the same Idempotency-Key never got the run's 200: "
            + _describe(final)
        )
    else:
        assert final.json() == {"first": 1, "flaky": "paid"}
        assert calls["first"] == 1, "a committed step ran again"
    with app.app_context():
        info = durable.get_run(run_id)
    if info is None or info.status != "completed":
        problems.append(f"run {run_id} is {info and info.status}, not completed")
    assert not problems, "\n".join(problems)


def test_sqlite_pool_exhausted_is_503_and_retried_run_is_not_failed(
    make_app: Any, live_server: Any
) -> None:
    # The store keeps one connection for writes; one more is left in the
    # pool, and the test holds it (as busy threads of the app would): every
    # check-out then ends in SQLAlchemy's pool TimeoutError.
    app = make_app(
        DURABLE_ENGINE_OPTIONS={"pool_size": 2, "max_overflow": 0, "pool_timeout": 0.1},
        DURABLE_WAIT_TIMEOUT=1,
    )
    state = app.extensions["durable"]
    calls: Counter[str] = Counter()

    def flaky() -> str:
        calls["flaky"] += 1
        if calls["flaky"] == 1:
            raise RetryAfterError("try again in a second", "1s")
        return "paid"

    @app.post("/pay")
    @durable.endpoint
    def pay() -> Any:
        first = step.run("first", lambda: calls.update(["first"]) or 1)
        return jsonify(first=first, flaky=step.run("flaky", flaky))

    @app.post("/quick")
    @durable.endpoint
    def quick() -> Any:
        return jsonify(v=step.run("v", lambda: 1))

    server = live_server(app)
    done = server.post("/quick")
    assert done.status_code == 200  # the store's writer connection is taken
    parked = server.post(
        "/pay", headers={"Idempotency-Key": "pay-1", "Prefer": "respond-async"}
    )
    assert parked.status_code == 202, parked.text
    run_id = parked.headers["Durable-Run-Id"]

    problems: list[str] = []
    held = state.store.engine.raw_connection()  # the pool's last connection
    try:

        def row() -> Any:
            cur = held.cursor()
            try:
                cur.execute(
                    "SELECT status, attempt FROM durable_runs WHERE id = ?", (run_id,)
                )
                return cur.fetchone()
            finally:
                cur.close()

        _assert_503(
            server.post("/quick", headers={"Idempotency-Key": "q-1"}),
            "a new run with a key",
            problems,
        )
        # The wait URL of a run (finished or not) needs a connection too.
        _assert_503(server.get(parked.headers["Location"]), "the wait URL", problems)
        # The retry of "flaky" comes due: the scheduler claims the run (on
        # the store's writer connection) and replays it, which needs a pool
        # connection to read the run's steps.
        wait_for(lambda: row()[1] >= 1, 20, "the scheduler to claim the run")
        time.sleep(1.0)  # the replay meets the empty pool meanwhile
    finally:
        held.close()

    # With a connection free again, the client's retry with the same key
    # gets the run's real response: a pool timeout did not fail the run.
    final = _retry_with_key(server, app, "/pay", "pay-1", run_id, time.monotonic() + 30)
    if final is None or final.status_code != 200:
        with app.app_context():
            info = durable.get_run(run_id)
        problems.append(
            "the retry with the same Idempotency-Key never got the run's 200: "
            + _describe(final)
            + f" (the run is {info and info.status})"
        )
    else:
        assert final.json() == {"first": 1, "flaky": "paid"}
        assert calls == {"first": 1, "flaky": 2}
    assert not problems, "\n".join(problems)


# -- 4. No "lease lost" for runs that finished ------------------------------


def test_no_lease_lost_warning_for_finished_runs(
    make_app: Any, live_server: Any, caplog: pytest.LogCaptureFixture
) -> None:
    # A 0.3 s lease: the heartbeat renews the leases of the runs executing
    # here every 0.1 s. Async checkpoints: the writer thread commits the
    # final responses of several runs in one batch, then takes each run out
    # of the active set and sends its signals, one run after the other.
    app = make_app(DURABLE_LEASE_SECONDS=0.3, DURABLE_CHECKPOINT="async")
    caplog.set_level(logging.WARNING, logger="flask_durable")

    @app.post("/quick/<int:i>")
    @durable.endpoint
    def quick(i: int) -> Any:
        a = step.run("a", lambda: i)
        b = step.run("b", lambda: i + 1)
        return jsonify(a=a, b=b)

    completed: set[str] = set()

    def on_completed(sender: Flask, run_id: str, **extra: Any) -> None:
        # A receiver that does a little I/O (metrics, an audit log): the
        # runs committed in the same batch wait for it before they leave
        # the active set, while the heartbeat goes on.
        completed.add(run_id)
        time.sleep(0.15)

    signals.run_completed.connect(on_completed, app)
    server = live_server(app)
    clients, per_client = 4, 5

    def client(n: int) -> list[str]:
        ids = []
        with requests.Session() as session:
            for k in range(per_client):
                # With a key, the run is stored (and its lease renewed) from
                # the start.
                r = session.post(
                    f"{server.url}/quick/{n}",
                    headers={"Idempotency-Key": f"quick-{n}-{k}"},
                    timeout=30,
                )
                assert r.status_code == 200, r.text
                ids.append(r.headers["Durable-Run-Id"])
        return ids

    try:
        with ThreadPoolExecutor(clients, thread_name_prefix="client") as pool:
            runs = {i for ids in pool.map(client, range(clients)) for i in ids}
        assert len(runs) == clients * per_client
        wait_for(lambda: runs <= completed, 30, "every run's run_completed signal")
    finally:
        signals.run_completed.disconnect(on_completed, app)
    lost = [
        match.group(1)
        for rec in caplog.records
        if rec.name == "flask_durable"
        and (match := re.match(r"run (\w+): lease lost", rec.getMessage()))
    ]
    spurious = sorted(set(lost) & completed)
    assert not spurious, (
        f"{len(spurious)} of {len(runs)} runs that completed were reported"
        f" 'lease lost': {spurious}"
    )
