"""Upgrading from 0.1 (schema version 1): the tables are migrated in place
the first time an app uses them, and the runs written by 0.1 carry on.

The version-1 tables come from ``tests/data/schema_v1_*.sql`` (what 0.1
created); the rows below are shaped as 0.1 wrote them.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from flask import Flask, jsonify, request
from werkzeug.test import EnvironBuilder

from flask_durable import Durable, step
from flask_durable.replay import capture_request
from flask_durable.store import base as store_base
from flask_durable.store.schema import migrate

DATA = Path(__file__).parent / "data"

durable = Durable()

FINISHED = "01a0000000000000000000000000f1d0"
SLEEPING = "01a000000000000000000000000051e0"
WAITING = "01a0000000000000000000000000a170"

FINISHED_BODY = b'{"n": 1}'
SLEEPING_BODY = b'{"long": true, "n": 2}'
FINISHED_RESPONSE_BODY = b'{"charge":{"paid":true},"reserve":{"seat":1}}\n'


@pytest.fixture
def db_url(any_db_url: str) -> str:
    """``make_app`` on SQLite and on PostgreSQL."""
    return any_db_url


def routes(app: Flask) -> Counter[str]:
    """The endpoints of the 0.1 app, with the same ids and step ids; returns
    the number of calls of each step function."""
    calls: Counter[str] = Counter()

    def reserve(n: int) -> dict[str, int]:
        calls["reserve"] += 1
        return {"seat": n}

    def charge() -> dict[str, bool]:
        calls["charge"] += 1
        return {"paid": True}

    @app.post("/trip")
    @durable.endpoint(id="trip")
    def trip() -> Any:
        body = request.get_json()
        r = step.run("reserve", reserve, body["n"])
        step.sleep("nap", "1h" if body.get("long") else "0s")
        c = step.run("charge", charge)
        return jsonify(reserve=r, charge=c)

    @app.post("/approve")
    @durable.endpoint(id="approve")
    def approve() -> Any:
        ev = step.wait_for_event(
            "approval", event="approved", match={"data.k": 1}, timeout="1h"
        )
        return jsonify(ev=ev)

    return calls


# -- a database as 0.1 left it ---------------------------------------------------


def _engine(url: str) -> sa.Engine:
    return sa.create_engine(url, poolclass=sa.pool.NullPool)


def create_v1_tables(url: str, version: int = 1) -> None:
    """The 0.1 tables, with ``schema_version`` 1 (or those of ``version``)."""
    engine = _engine(url)
    name = "postgresql" if engine.dialect.name == "postgresql" else "sqlite"
    text = (DATA / f"schema_v{version}_{name}.sql").read_text()
    if version > 1:
        text += (
            "\nINSERT INTO durable_meta (key, value)"
            f" VALUES ('schema_version', '{version}');"
        )
    lines = [line for line in text.splitlines() if not line.startswith("--")]
    statements = [s.strip() for s in "\n".join(lines).split(";") if s.strip()]
    try:
        with engine.begin() as conn:
            for statement in statements:
                conn.exec_driver_sql(statement)
    finally:
        engine.dispose()


def _request(path: str, body: bytes, headers: dict[str, str] | None = None) -> bytes:
    builder = EnvironBuilder(
        method="POST",
        path=path,
        data=body,
        content_type="application/json",
        headers=headers,
    )
    try:
        return capture_request(builder.get_environ(), body)
    finally:
        builder.close()


def _request_hash(path: str, body: bytes) -> str:
    digest = hashlib.sha256()
    for part in ("POST", path, ""):
        digest.update(part.encode() + b"\0")
    digest.update(body)
    return digest.hexdigest()


def _response(run_id: str) -> bytes:
    headers = [
        ["Content-Type", "application/json"],
        ["Content-Length", str(len(FINISHED_RESPONSE_BODY))],
        ["Durable-Run-Id", run_id],
    ]
    meta = json.dumps({"status": "200 OK", "headers": headers}, separators=(",", ":"))
    return meta.encode() + b"\n" + FINISHED_RESPONSE_BODY


def insert_v1_rows(url: str) -> float:
    """A finished run (with an idempotency key), a run sleeping until a
    second ago, a run waiting for an event, and an event. Returns now."""
    now = time.time()
    engine = _engine(url)
    tables = sa.MetaData()
    tables.reflect(engine)
    runs, steps = tables.tables["durable_runs"], tables.tables["durable_steps"]
    waits, events = tables.tables["durable_waits"], tables.tables["durable_events"]
    # Version 2 tables carry the app id.
    app: dict[str, Any] = {"app_id": "shop"} if "app_id" in runs.c else {}
    run: dict[str, Any] = {
        **app,
        "endpoint": "trip",
        "attempt": 0,
        "version": 0,
        "finished_at": None,
        "due_at": None,
        "deadline": None,
        "lease_owner": None,
        "lease_expires_at": None,
        "cancel_requested": False,
        "idempotency_key": None,
        "request_hash": None,
        "idempotency_expires_at": None,
        "response": None,
        "error": None,
    }
    step_row: dict[str, Any] = {
        "output": None,
        "error": None,
        "due_at": None,
        "finished_at": None,
    }

    def done(run_id: str, seq: int, step_id: str, output: str, at: float) -> Any:
        return dict(
            step_row,
            run_id=run_id,
            step_id=step_id,
            seq=seq,
            status="completed",
            attempts=1,
            output=output,
            started_at=at,
            finished_at=at + 0.001,
        )

    try:
        with engine.begin() as conn:
            conn.execute(
                runs.insert(),
                [
                    dict(
                        run,
                        id=FINISHED,
                        status="completed",
                        created_at=now - 120,
                        updated_at=now - 119,
                        finished_at=now - 119,
                        idempotency_key="k-1",
                        request_hash=_request_hash("/trip", FINISHED_BODY),
                        idempotency_expires_at=now + 86400,
                        request=_request(
                            "/trip", FINISHED_BODY, {"Idempotency-Key": "k-1"}
                        ),
                        response=_response(FINISHED),
                    ),
                    dict(
                        run,
                        id=SLEEPING,
                        status="sleeping",
                        created_at=now - 60,
                        updated_at=now - 60,
                        due_at=now - 1,
                        request=_request("/trip", SLEEPING_BODY),
                    ),
                    dict(
                        run,
                        id=WAITING,
                        endpoint="approve",
                        status="waiting",
                        created_at=now - 30,
                        updated_at=now - 30,
                        due_at=now + 3600,
                        request=_request("/approve", b"{}"),
                    ),
                ],
            )
            conn.execute(
                steps.insert(),
                [
                    done(FINISHED, 0, "reserve", '{"seat":1}', now - 120),
                    done(FINISHED, 1, "nap", "null", now - 120),
                    done(FINISHED, 2, "charge", '{"paid":true}', now - 120),
                    done(SLEEPING, 0, "reserve", '{"seat":2}', now - 60),
                    dict(
                        step_row,
                        run_id=SLEEPING,
                        step_id="nap",
                        seq=1,
                        status="sleeping",
                        attempts=0,
                        due_at=now - 1,
                        started_at=now - 60,
                    ),
                    dict(
                        step_row,
                        run_id=WAITING,
                        step_id="approval",
                        seq=0,
                        status="waiting",
                        attempts=0,
                        due_at=now + 3600,
                        started_at=now - 30,
                    ),
                ],
            )
            conn.execute(
                waits.insert().values(
                    **app,
                    run_id=WAITING,
                    step_id="approval",
                    event="approved",
                    match='{"data.k":1}',
                    since=now - 30,
                    expires_at=now + 3600,
                )
            )
            conn.execute(
                events.insert().values(
                    **app, id="ev-1", name="other", data='{"x":1}', ts=now - 10
                )
            )
    finally:
        engine.dispose()
    return now


def query(url: str, sql: str) -> list[Any]:
    engine = _engine(url)
    try:
        with engine.connect() as conn:
            return list(conn.exec_driver_sql(sql))
    finally:
        engine.dispose()


def schema_version(url: str) -> str:
    rows = query(url, "SELECT value FROM durable_meta WHERE key = 'schema_version'")
    return str(rows[0][0])


def columns(url: str, table: str) -> set[str]:
    engine = _engine(url)
    try:
        return {c["name"] for c in sa.inspect(engine).get_columns(table)}
    finally:
        engine.dispose()


def wait_for_status(app: Flask, run_id: str, status: str, timeout: float) -> Any:
    deadline = time.monotonic() + timeout
    with app.app_context():
        while True:
            info = durable.get_run(run_id)
            if info is not None and info.status == status:
                return info
            if time.monotonic() > deadline:
                raise AssertionError(f"run {run_id} is {info and info.status}")
            time.sleep(0.05)


# -- tests -------------------------------------------------------------------------


def test_v1_database_is_migrated_and_its_runs_carry_on(
    make_app: Any, db_url: str
) -> None:
    create_v1_tables(db_url)
    insert_v1_rows(db_url)
    app = make_app(DURABLE_APP_ID="shop")
    calls = routes(app)
    with app.app_context():
        durable.start()

    assert schema_version(db_url) == "3"
    assert "app_id" in columns(db_url, "durable_runs")
    assert "history" in columns(db_url, "durable_steps")

    # The finished run, with its steps and its response.
    with app.app_context():
        info = durable.get_run(FINISHED)
    assert info is not None
    assert info.status == "completed"
    assert info.endpoint == "trip"
    assert [(s.id, s.status, s.output) for s in info.steps] == [
        ("reserve", "completed", {"seat": 1}),
        ("nap", "completed", None),
        ("charge", "completed", {"paid": True}),
    ]
    assert info.response is not None
    assert info.response[0] == 200
    assert info.response[2] == FINISHED_RESPONSE_BODY

    # The sleeping run is resumed by the scheduler; its first step is not
    # run again.
    info = wait_for_status(app, SLEEPING, "completed", timeout=15)
    assert calls == {"charge": 1}
    assert info.response is not None
    assert json.loads(info.response[2]) == {
        "reserve": {"seat": 2},
        "charge": {"paid": True},
    }
    assert [s.id for s in info.steps] == ["reserve", "nap", "charge"]

    # Rows written before the upgrade belong to the migrating app.
    assert {r[0] for r in query(db_url, "SELECT app_id FROM durable_runs")} == {"shop"}
    assert query(db_url, "SELECT app_id FROM durable_waits") == [("shop",)]

    # The key stored by 0.1 still maps to its run.
    client = app.test_client()
    repeat = client.post(
        "/trip",
        data=FINISHED_BODY,
        content_type="application/json",
        headers={"Idempotency-Key": "k-1"},
    )
    assert repeat.status_code == 200
    assert repeat.data == FINISHED_RESPONSE_BODY
    assert repeat.headers["Durable-Run-Id"] == FINISHED
    assert calls == {"charge": 1}
    other = client.post(
        "/trip",
        data=b'{"n": 3}',
        content_type="application/json",
        headers={"Idempotency-Key": "k-1"},
    )
    assert other.status_code == 422

    # Events were recreated (ids sent before are forgotten); the wait
    # written by 0.1 still receives a new event.
    assert query(db_url, "SELECT COUNT(*) FROM durable_events") == [(0,)]
    with app.app_context():
        durable.send("approved", {"k": 1})
    info = wait_for_status(app, WAITING, "completed", timeout=15)
    assert info.response is not None
    assert json.loads(info.response[2])["ev"]["data"] == {"k": 1}


def test_v2_database_is_migrated_and_its_runs_carry_on(
    make_app: Any, db_url: str
) -> None:
    """Version 2 (flask-durable 0.2 before flow control) -> 3."""
    create_v1_tables(db_url, version=2)
    insert_v1_rows(db_url)
    app = make_app(DURABLE_APP_ID="shop")
    calls = routes(app)
    with app.app_context():
        durable.start()
    assert schema_version(db_url) == "3"
    assert "flow_key" in columns(db_url, "durable_runs")
    assert query(db_url, "SELECT COUNT(*) FROM durable_flow") == [(0,)]
    info = wait_for_status(app, SLEEPING, "completed", timeout=15)
    assert calls == {"charge": 1}
    assert [s.id for s in info.steps] == ["reserve", "nap", "charge"]
    with app.app_context():
        finished = durable.get_run(FINISHED)
        durable.send("approved", {"k": 1})
    assert finished is not None and finished.status == "completed"
    info = wait_for_status(app, WAITING, "completed", timeout=15)
    assert info.response is not None
    assert json.loads(info.response[2])["ev"]["data"] == {"k": 1}


def test_apps_starting_together_migrate_once(
    make_app: Any, db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    create_v1_tables(db_url)
    insert_v1_rows(db_url)
    migrations: list[int] = []

    def counted(conn: Any, found: int, app_id: str) -> None:
        migrations.append(found)
        migrate(conn, found, app_id)

    monkeypatch.setattr(store_base, "migrate", counted)
    apps = [make_app(DURABLE_APP_ID="shop") for _ in range(2)]
    barrier = threading.Barrier(len(apps))
    errors: list[BaseException] = []

    def start(app: Flask) -> None:
        try:
            barrier.wait(10)
            app.extensions["durable"].ensure_schema()
        except BaseException as e:  # reported below
            errors.append(e)

    threads = [
        threading.Thread(target=start, args=(app,), name=f"upgrade-{i}")
        for i, app in enumerate(apps)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads)
    assert errors == []
    assert migrations == [1]
    assert schema_version(db_url) == "3"
    assert "app_id" in columns(db_url, "durable_events")
    assert {r[0] for r in query(db_url, "SELECT app_id FROM durable_runs")} == {"shop"}
    # Both apps can use the migrated tables.
    for app in apps:
        routes(app)
        with app.app_context():
            info = durable.get_run(FINISHED)
        assert info is not None and info.status == "completed"


def test_newer_schema_is_refused(make_app: Any, db_url: str) -> None:
    create_v1_tables(db_url)
    engine = _engine(db_url)
    try:
        with engine.begin() as conn:
            conn.exec_driver_sql(
                "UPDATE durable_meta SET value = '99' WHERE key = 'schema_version'"
            )
    finally:
        engine.dispose()
    app = make_app(DURABLE_APP_ID="shop")
    with pytest.raises(RuntimeError, match=r"schema version 99.*upgrade"):
        app.extensions["durable"].ensure_schema()
    assert schema_version(db_url) == "99"
    assert "app_id" not in columns(db_url, "durable_runs")
