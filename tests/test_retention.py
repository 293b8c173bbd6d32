"""Retention: terminal runs older than DURABLE_RETENTION are deleted."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from flask import Flask, jsonify

from flask_durable import Durable, step
from flask_durable.config import Config
from flask_durable.store import Store, open_store
from flask_durable.store.schema import runs, steps, waits

DAY = 86400.0
durable = Durable()


@pytest.fixture
def db_url(any_db_url: str) -> str:
    return any_db_url


def _open(url: str, tmp_path: Any, app_id: str) -> Store:
    app = Flask(app_id, instance_path=str(tmp_path / "instance"))
    app.config.update(DURABLE_DATABASE_URI=url, DURABLE_APP_ID=app_id)
    store = open_store(Config.from_app(app))
    store.create_all()
    return store


@pytest.fixture
def stores(db_url: str, tmp_path: Any) -> Iterator[tuple[Store, Store]]:
    mine, other = _open(db_url, tmp_path, "tests"), _open(db_url, tmp_path, "other")
    yield mine, other
    mine.dispose()
    other.dispose()


def _insert(
    store: Store,
    created: float,
    finished: float | None = None,
    status: str = "completed",
    due: float | None = None,
    n_steps: int = 2,
) -> str:
    """A run row written as old code would have, with ``n_steps`` steps
    and one wait; returns its id."""
    run_id = f"{int(created * 1000):012x}{os.urandom(10).hex()}"
    row = {c.name: None for c in runs.columns}
    row.update(
        id=run_id,
        app_id=store.app_id,
        endpoint="e",
        status=status,
        attempt=1,
        version=1,
        created_at=created,
        updated_at=finished or created,
        finished_at=finished,
        due_at=due,
        cancel_requested=False,
        request=b'{"environ":{}}\n',
    )
    with store.begin() as conn:
        conn.execute(runs.insert(), row)
        for i in range(n_steps):
            conn.execute(
                steps.insert(),
                {
                    "run_id": run_id,
                    "step_id": f"s{i}",
                    "seq": i,
                    "status": "completed",
                    "attempts": 1,
                    "output": "1",
                    "started_at": created,
                    "finished_at": created,
                },
            )
        conn.execute(
            waits.insert(),
            {
                "run_id": run_id,
                "step_id": "w",
                "app_id": store.app_id,
                "event": "ev",
                "match": "{}",
                "since": created,
                "expires_at": created + DAY,
            },
        )
    return run_id


def _count(store: Store, table: sa.Table, run_id: str) -> int:
    column = table.c.id if table is runs else table.c.run_id
    with store.read() as conn:
        return int(
            conn.execute(
                sa.select(sa.func.count()).select_from(table).where(column == run_id)
            ).scalar_one()
        )


def _exists(store: Store, run_id: str) -> bool:
    return _count(store, runs, run_id) == 1


def test_old_terminal_runs_go_with_their_steps_and_waits(
    stores: tuple[Store, Store],
) -> None:
    mine, other = stores
    now = time.time()
    old = now - 10 * DAY
    gone = [
        _insert(mine, old, old + 60, status)
        for status in ("completed", "failed", "cancelled")
    ]
    running = _insert(mine, old, None, "running", due=old)
    sleeping = _insert(mine, old, None, "scheduled", due=now + DAY)
    recent = _insert(mine, now - 60, now - 30)
    # Created long ago, finished recently: kept.
    late = _insert(mine, old, now - 30)
    foreign = _insert(other, old, old + 60)

    assert mine.prune(now - 7 * DAY, 500) == 3
    for run_id in gone:
        assert not _exists(mine, run_id)
        assert _count(mine, steps, run_id) == 0
        assert _count(mine, waits, run_id) == 0
    for run_id in (running, sleeping, recent, late, foreign):
        assert _exists(mine, run_id)
        assert _count(mine, steps, run_id) == 2
    assert mine.prune(now - 7 * DAY, 500) == 0
    # The other app prunes its own runs only.
    assert other.prune(now - 7 * DAY, 500) == 1
    assert not _exists(other, foreign)
    assert _exists(mine, recent)


def test_one_call_deletes_at_most_limit_runs(stores: tuple[Store, Store]) -> None:
    mine, _ = stores
    old = time.time() - 10 * DAY
    ids = [_insert(mine, old + i, old + i + 1, n_steps=1) for i in range(7)]
    before = time.time() - DAY
    assert [mine.prune(before, 3) for _ in range(4)] == [3, 3, 1, 0]
    assert not any(_exists(mine, run_id) for run_id in ids)


def test_the_scheduler_prunes_in_bounded_batches(make_app: Any) -> None:
    app = make_app(DURABLE_RETENTION="7d")
    lifecycle = app.extensions["durable"]
    lifecycle.ensure_schema()
    store = lifecycle.store
    old = time.time() - 10 * DAY
    ids = [_insert(store, old + i, old + i + 1, n_steps=0) for i in range(5)]
    assert lifecycle.scheduler.prune(batch=2, max_batches=2, pause=0) == 4
    assert sum(_exists(store, run_id) for run_id in ids) == 1
    assert lifecycle.scheduler.prune(batch=2, max_batches=2, pause=0) == 1
    assert not any(_exists(store, run_id) for run_id in ids)


def test_no_retention_deletes_nothing(make_app: Any) -> None:
    app = make_app(DURABLE_RETENTION=None)
    lifecycle = app.extensions["durable"]
    lifecycle.ensure_schema()
    run_id = _insert(lifecycle.store, time.time() - 400 * DAY, time.time() - 399 * DAY)
    lifecycle.scheduler.housekeeping()
    assert lifecycle.scheduler.prune() == 0
    assert _exists(lifecycle.store, run_id)


def test_a_finished_run_is_deleted_once_past_a_tiny_retention(
    make_app: Any,
) -> None:
    app = make_app(DURABLE_RETENTION=0.3)

    @app.post("/hello")
    @durable.endpoint
    def hello() -> Any:
        return jsonify(n=step.run("one", lambda: 1))

    lifecycle = app.extensions["durable"]
    client = app.test_client()
    response = client.post("/hello")
    assert response.status_code == 200
    run_id = response.headers["Durable-Run-Id"]
    assert _exists(lifecycle.store, run_id)
    assert _count(lifecycle.store, steps, run_id) == 1
    time.sleep(0.5)
    lifecycle.scheduler.housekeeping()
    assert not _exists(lifecycle.store, run_id)
    assert _count(lifecycle.store, steps, run_id) == 0
