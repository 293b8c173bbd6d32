"""Store-level guarantees that are hard to hit through HTTP timing."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
from flask import Flask

from flask_durable.config import Config
from flask_durable.records import (
    Checkpoint,
    FinalState,
    Finish,
    NewRun,
    StepRecord,
    Suspension,
)
from flask_durable.store import Store, open_store

ENDPOINTS = ("e",)


def _open(url: str, tmp_path: Any, app_id: str = "tests", **config: Any) -> Store:
    app = Flask(app_id, instance_path=str(tmp_path / "instance"))
    app.config.update(DURABLE_DATABASE_URI=url, DURABLE_APP_ID=app_id, **config)
    store = open_store(Config.from_app(app))
    store.create_all()
    return store


@pytest.fixture
def store(any_db_url: str, tmp_path: Any) -> Iterator[Store]:
    store = _open(any_db_url, tmp_path)
    yield store
    store.dispose()


def _run(run_id: str, owner: str, app_id: str = "tests") -> NewRun:
    return NewRun(
        id=run_id,
        app_id=app_id,
        endpoint="e",
        created_at=time.time(),
        deadline=None,
        owner=owner,
        request=b'{"environ":{}}\n',
    )


def _step(step_id: str, status: str, due: float | None = None) -> StepRecord:
    return StepRecord(step_id, 0, status, due_at=due, started_at=time.time())


def _new(store: Store, run_id: str, owner: str, *steps: StepRecord) -> None:
    assert store.write(Checkpoint(run_id, owner, list(steps), [], _run(run_id, owner)))


def _park(store: Store, run_id: str, owner: str, due: float, version: int = 0) -> Any:
    return store.suspend(
        Suspension(run_id, owner, version, "scheduled", due, [], [], [])
    )


def test_suspend_of_a_run_woken_meanwhile_makes_it_due_now(store: Store) -> None:
    _new(store, "r1", "me", _step("a", "completed"))
    # An event woke the run (its version moved) while it was executing.
    assert store.request_cancel("r1")
    due = store.suspend(
        Suspension(
            "r1",
            "me",
            0,
            "sleeping",
            time.time() + 3600,
            [_step("nap", "sleeping")],
            [],
            [],
        )
    )
    assert due is not None and due <= time.time()
    row = store.get_run("r1")
    assert row.status == "scheduled"
    assert row.lease_owner is None
    assert [s.step_id for s in store.load_steps("r1")] == ["a", "nap"]


def test_writes_of_a_process_that_lost_its_lease_are_refused(store: Store) -> None:
    _new(store, "r2", "old", _step("a", "completed"))
    _park(store, "r2", "old", time.time() - 1)
    claimed = store.claim("r2", "new", ENDPOINTS)
    assert claimed is not None and claimed.id == "r2"
    assert not store.write(Checkpoint("r2", "old", [_step("b", "completed")], []))
    assert not store.write(Checkpoint("r2", "old", [], [_step("a", "failed")]))
    assert not store.write(Finish("r2", "old", "completed", b"x", None))
    assert _park(store, "r2", "old", time.time(), claimed.version) is None
    assert not store.renew_one("r2", "old")
    assert [s.status for s in store.load_steps("r2")] == ["completed"]
    assert store.renew_one("r2", "new")
    assert store.write(Finish("r2", "new", "completed", b"final", None))
    assert store.get_final("r2") == FinalState("completed", b"final")


def test_a_due_run_is_claimed_once(store: Store) -> None:
    for i in range(5):
        _new(store, f"c{i}", "w")
        _park(store, f"c{i}", "w", time.time() - 1)
    first = store.claim_due("p1", 3, ENDPOINTS)
    second = store.claim_due("p2", 10, ENDPOINTS)
    assert len(first) == 3 and len(second) == 2
    assert {r.id for r in first} | {r.id for r in second} == {f"c{i}" for i in range(5)}
    assert store.claim_due("p3", 10, ENDPOINTS) == []
    assert store.claim("c0", "p4", ENDPOINTS) is None


def test_only_runs_of_registered_endpoints_are_claimed(store: Store) -> None:
    _new(store, "x1", "w")
    _park(store, "x1", "w", time.time() - 1)
    assert store.claim_due("p", 10, ("other",)) == []
    assert store.claim_due("p", 10, ()) == []
    assert store.claim("x1", "p", ("other",)) is None
    assert [c.id for c in store.claim_due("p", 10, ("other", "e"))] == ["x1"]


def test_apps_sharing_a_database_never_see_each_other(
    any_db_url: str, tmp_path: Any
) -> None:
    one = _open(any_db_url, tmp_path, "one")
    two = _open(any_db_url, tmp_path, "two")
    try:
        one.write(Checkpoint("a1", "w", [], [], _run("a1", "w", "one")))
        _park(one, "a1", "w", time.time() - 1)
        assert two.claim_due("p", 10, ENDPOINTS) == []
        assert two.get_run("a1") is None and two.get_final("a1") is None
        assert not two.request_cancel("a1")
        assert two.insert_event("ev", "n", "{}", time.time(), 60)
        assert one.insert_event("ev", "n", "{}", time.time(), 60)  # not a duplicate
        assert [c.id for c in one.claim_due("p", 10, ENDPOINTS)] == ["a1"]
    finally:
        one.dispose()
        two.dispose()


def test_a_new_runs_lease_starts_when_its_row_is_written(store: Store) -> None:
    run = NewRun("l1", "tests", "e", time.time() - 100, None, "me", b"{}\n")
    store.write(Checkpoint("l1", "me", [_step("a", "completed")], [], run))
    row = store.get_run("l1")
    assert row.lease_expires_at > time.time() + store.lease_seconds - 5


@pytest.mark.postgres
@pytest.mark.parametrize("notify", [True, False])
def test_postgres_finish_skips_the_wal_flush_of_its_own_commit_only(
    pg_url: str, tmp_path: Any, notify: bool
) -> None:
    # One connection: the finish and the checks below share it.
    store = _open(
        pg_url, tmp_path, DURABLE_ENGINE_OPTIONS={"pool_size": 1, "max_overflow": 0}
    )
    try:
        _new(store, "q1", "me", _step("a", "completed"))
        assert store.write(
            Finish(
                "q1",
                "me",
                "completed",
                b"final",
                None,
                waits_possible=False,
                notify=notify,
            )
        )
        with store.engine.connect() as conn:
            setting = conn.exec_driver_sql("SHOW synchronous_commit").scalar()
        # Only that one transaction committed without waiting for the flush.
        assert setting == "on"
        row = store.get_run("q1")
        assert (row.status, bytes(row.response), row.lease_owner) == (
            "completed",
            b"final",
            None,
        )
        assert not store.write(
            Finish("q1", "me", "failed", b"again", None, waits_possible=False)
        )
    finally:
        store.dispose()


def test_unknown_database_is_a_clear_error(tmp_path: Any) -> None:
    app = Flask("x", instance_path=str(tmp_path))
    app.config["DURABLE_DATABASE_URI"] = "mysql://u@localhost/db"
    with pytest.raises(ValueError, match="SQLite or PostgreSQL"):
        open_store(Config.from_app(app))
