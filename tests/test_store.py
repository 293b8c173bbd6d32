"""Store-level guarantees that are hard to hit through HTTP timing."""

from __future__ import annotations

import time
from typing import Any

import pytest

from flask_durable.store import LeaseLost, Store


@pytest.fixture
def store(any_db_url: str) -> Any:
    store = Store(any_db_url)
    store.create_all()
    yield store
    store.dispose()


def _run(run_id: str, owner: str) -> dict[str, Any]:
    now = time.time()
    return {
        "id": run_id,
        "endpoint": "e",
        "status": "running",
        "attempt": 0,
        "version": 0,
        "created_at": now,
        "updated_at": now,
        "due_at": now,
        "deadline": None,
        "lease_owner": owner,
        "lease_expires_at": now + 30,
        "cancel_requested": False,
        "idempotency_key": None,
        "request_hash": None,
        "idempotency_expires_at": None,
        "request": b'{"environ":{}}\n',
    }


def _step(step_id: str, status: str, due: float | None = None) -> dict[str, Any]:
    return {
        "step_id": step_id,
        "seq": 0,
        "status": status,
        "attempts": 0,
        "output": None,
        "error": None,
        "due_at": due,
        "started_at": time.time(),
        "finished_at": None,
    }


def test_suspend_of_a_run_woken_meanwhile_makes_it_due_now(store: Any) -> None:
    store.write_steps(
        "r1", "me", [_step("a", "completed")], [], new_run=_run("r1", "me")
    )
    # An event woke the run (its version moved) while it was executing.
    assert store.request_cancel("r1")
    due = store.suspend(
        "r1",
        "me",
        0,
        "sleeping",
        time.time() + 3600,
        [_step("nap", "sleeping")],
        [],
        [],
    )
    assert due <= time.time()
    row = store.get_run("r1")
    assert row.status == "scheduled"
    assert row.lease_owner is None
    assert [s["step_id"] for s in store.load_steps("r1")] == ["a", "nap"]


def test_writes_of_a_process_that_lost_its_lease_are_refused(store: Any) -> None:
    store.write_steps(
        "r2", "old", [_step("a", "completed")], [], new_run=_run("r2", "old")
    )
    store.suspend("r2", "old", 0, "scheduled", time.time() - 1, [], [], [])
    claimed = store.claim("r2", "new", 30)
    assert claimed is not None and claimed.id == "r2"
    with pytest.raises(LeaseLost):
        store.write_steps("r2", "old", [_step("b", "completed")], [])
    with pytest.raises(LeaseLost):
        store.write_steps("r2", "old", [], [_step("a", "failed")])
    with pytest.raises(LeaseLost):
        store.finish("r2", "old", "completed", b"x", None)
    with pytest.raises(LeaseLost):
        store.suspend("r2", "old", claimed.version, "sleeping", time.time(), [], [], [])
    assert [s["status"] for s in store.load_steps("r2")] == ["completed"]
    store.finish("r2", "new", "completed", b"final", None)
    assert store.get_final("r2") == ("completed", b"final")


def test_a_due_run_is_claimed_once(store: Any) -> None:
    for i in range(5):
        store.write_steps(f"c{i}", "w", [], [], new_run=_run(f"c{i}", "w"))
        store.suspend(f"c{i}", "w", 0, "scheduled", time.time() - 1, [], [], [])
    first = store.claim_due("p1", 30, 3)
    second = store.claim_due("p2", 30, 10)
    assert len(first) == 3 and len(second) == 2
    assert {r.id for r in first} | {r.id for r in second} == {f"c{i}" for i in range(5)}
    assert store.claim_due("p3", 30, 10) == []
    assert store.claim("c0", "p4", 30) is None


@pytest.mark.postgres
@pytest.mark.parametrize("notify", [True, False])
def test_postgres_finish_skips_the_wal_flush_of_its_own_commit_only(
    pg_url: str, notify: bool
) -> None:
    # One connection: the finish and the checks below share it.
    store = Store(pg_url, {"pool_size": 1, "max_overflow": 0})
    try:
        store.create_all()
        store.write_steps(
            "q1", "me", [_step("a", "completed")], [], new_run=_run("q1", "me")
        )
        store.finish(
            "q1", "me", "completed", b"final", None, waits_possible=False, notify=notify
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
        with pytest.raises(LeaseLost):
            store.finish("q1", "me", "failed", b"again", None, waits_possible=False)
    finally:
        store.dispose()
