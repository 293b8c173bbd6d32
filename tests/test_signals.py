"""Every signal of :mod:`flask_durable.signals` is sent with its documented
keyword arguments, and only once the state it announces is committed.

Each receiver reads the database through an engine of its own (a separate
connection sees committed rows only) and records what it saw, in the thread
that sent the signal.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from flask import Flask, jsonify
from sqlalchemy.pool import NullPool

from flask_durable import Durable, RetryAfterError, signals, step

durable = Durable()

#: The documented keyword arguments of each signal.
DOCUMENTED = {
    "run_started": {"run_id", "endpoint"},
    "run_resumed": {"run_id", "endpoint", "attempt"},
    "step_completed": {"run_id", "step_id"},
    "step_failed": {"run_id", "step_id", "final", "attempt", "error"},
    "run_suspended": {"run_id", "status", "due_at"},
    "run_completed": {"run_id", "endpoint"},
    "run_failed": {"run_id", "endpoint", "status"},
}
WRITER_THREAD = "durable-checkpoint"


@pytest.fixture
def db_url(any_db_url: str) -> str:
    return any_db_url


@pytest.fixture(params=["sync", "async"])
def checkpoint(request: Any) -> str:
    return str(request.param)


class Peek:
    """Reads rows with a connection of its own."""

    def __init__(self, url: str) -> None:
        self.engine = sa.create_engine(url, poolclass=NullPool)

    def run(self, run_id: str) -> dict[str, Any] | None:
        with self.engine.connect() as conn:
            row = conn.execute(
                sa.text(
                    "SELECT status, attempt, lease_owner, response FROM durable_runs"
                    " WHERE id = :id"
                ),
                {"id": run_id},
            ).first()
        if row is None:
            return None
        return {
            "status": row.status,
            "attempt": row.attempt,
            "leased": row.lease_owner is not None,
            "response": row.response is not None,
        }

    def step(self, run_id: str, step_id: str) -> str | None:
        with self.engine.connect() as conn:
            return conn.execute(
                sa.text(
                    "SELECT status FROM durable_steps"
                    " WHERE run_id = :run_id AND step_id = :step_id"
                ),
                {"run_id": run_id, "step_id": step_id},
            ).scalar()


class Recorder:
    """Connects a receiver to every signal, for one app."""

    def __init__(self, app: Flask, url: str) -> None:
        self.app = app
        self.peek = Peek(url)
        self.seen: list[dict[str, Any]] = []
        self.problems: list[str] = []
        self.lock = threading.Lock()
        self.receivers: list[tuple[Any, Callable[..., None]]] = []
        for name in DOCUMENTED:
            signal = getattr(signals, name)
            receiver = self._receiver(name)
            signal.connect(receiver, sender=app, weak=False)
            self.receivers.append((signal, receiver))

    def _receiver(self, name: str) -> Callable[..., None]:
        def receive(sender: Any, **kwargs: Any) -> None:
            try:
                entry = {
                    "signal": name,
                    "sender": sender,
                    "kwargs": kwargs,
                    "thread": threading.current_thread().name,
                    "run": self.peek.run(kwargs["run_id"]),
                    "step": None,
                }
                if "step_id" in kwargs:
                    entry["step"] = self.peek.step(kwargs["run_id"], kwargs["step_id"])
            except Exception as e:  # never raise from a receiver
                with self.lock:
                    self.problems.append(f"{name}: {type(e).__name__}: {e}")
                return
            with self.lock:
                self.seen.append(entry)

        return receive

    def close(self) -> None:
        for signal, receiver in self.receivers:
            signal.disconnect(receiver, sender=self.app)
        self.peek.engine.dispose()

    def of(self, run_id: str) -> list[dict[str, Any]]:
        with self.lock:
            return [e for e in self.seen if e["kwargs"]["run_id"] == run_id]

    def wait_for(self, run_id: str, name: str) -> list[dict[str, Any]]:
        """The run's signals once ``name`` was sent (final signals may
        follow the client's answer: the wait URL reads the database)."""
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            found = self.of(run_id)
            if any(e["signal"] == name for e in found):
                return found
            time.sleep(0.01)
        raise AssertionError(f"{name} was not sent for {run_id}: {self.of(run_id)}")


@pytest.fixture
def recorded(
    make_app: Callable[..., Flask], db_url: str, checkpoint: str
) -> Iterator[tuple[Flask, Recorder, dict[str, list[BaseException]]]]:
    app = make_app(DURABLE_CHECKPOINT=checkpoint)
    raised: dict[str, list[BaseException]] = {"flaky": [], "bad": []}

    # Retries are due a little later than the signals of the suspension
    # take: once a suspension is committed, the run may be resumed by another
    # thread while its receivers still run (signals of successive executions
    # of a run are not ordered; each follows its own commit).
    def flaky() -> str:
        if not raised["flaky"]:
            raised["flaky"].append(RetryAfterError("flaky once", 0.3))
            raise raised["flaky"][-1]
        return "fine"

    def bad() -> None:
        raised["bad"].append(RetryAfterError(f"bad #{len(raised['bad'])}", 0.3))
        raise raised["bad"][-1]

    @app.post("/flow")
    @durable.endpoint
    def flow() -> Any:
        step.sleep_until("past", "2000-01-01T00:00:00Z")  # over: written later
        step.run("ok", lambda: "ok")
        step.run("flaky", flaky)
        step.sleep("nap", "0.3s")
        step.run("after", lambda: "after")
        return jsonify(done=True)

    @app.post("/doomed")
    @durable.endpoint(retries=1)
    def doomed() -> Any:
        step.run("bad", bad)
        return "unreachable"

    @app.post("/nap")
    @durable.endpoint
    def nap() -> Any:
        step.sleep("nap", "0.3s")
        return jsonify(woke=True)

    @app.post("/long")
    @durable.endpoint
    def long() -> Any:
        step.sleep("long", "1h")
        return "unreachable"

    def much_later() -> None:
        raise RetryAfterError("not now", "1h")

    @app.post("/later")
    @durable.endpoint
    def later() -> Any:
        step.run("first", lambda: 1)
        step.run("retried", much_later)
        return "unreachable"

    recorder = Recorder(app, db_url)
    try:
        yield app, recorder, raised
    finally:
        recorder.close()
    assert recorder.problems == []


def check_common(app: Flask, entries: list[dict[str, Any]]) -> None:
    """Sender and documented keyword arguments of every signal."""
    for e in entries:
        assert e["sender"] is app
        documented = DOCUMENTED[e["signal"]]
        assert documented <= set(e["kwargs"]), (e["signal"], e["kwargs"])


def sequence(entries: list[dict[str, Any]]) -> list[tuple[str, str | None]]:
    return [(e["signal"], e["kwargs"].get("step_id")) for e in entries]


def test_signals_of_a_run_that_retries_and_sleeps(
    recorded: Any, live_server: Any, checkpoint: str
) -> None:
    app, recorder, raised = recorded
    r = live_server(app).post("/flow")
    assert r.status_code == 200 and r.json() == {"done": True}
    run_id = r.headers["Durable-Run-Id"]
    entries = recorder.wait_for(run_id, "run_completed")
    check_common(app, entries)
    assert sequence(entries) == [
        ("run_started", None),
        ("step_completed", "past"),  # the sleep that was over, written with "ok"
        ("step_completed", "ok"),
        ("step_failed", "flaky"),
        ("run_suspended", None),
        ("run_resumed", None),
        ("step_completed", "flaky"),
        ("run_suspended", None),
        ("run_resumed", None),
        ("step_completed", "nap"),  # over on the replay, written with "after"
        ("step_completed", "after"),
        ("run_completed", None),
    ]
    by = {(e["signal"], e["kwargs"].get("step_id")): e for e in entries}
    suspended = [e for e in entries if e["signal"] == "run_suspended"]
    resumed = [e for e in entries if e["signal"] == "run_resumed"]

    started = by[("run_started", None)]
    assert started["kwargs"]["endpoint"] == "flow"
    assert started["run"] is not None  # the row is committed
    for e in entries:
        if e["signal"] == "step_completed":
            assert e["step"] == "completed", e

    failed = by[("step_failed", "flaky")]
    assert failed["kwargs"]["final"] is False
    assert failed["kwargs"]["attempt"] == 0
    assert failed["kwargs"]["error"] is raised["flaky"][0]
    assert failed["step"] == "error"  # sent after the suspension's commit

    assert [e["kwargs"]["status"] for e in suspended] == ["scheduled", "sleeping"]
    for e in suspended:
        assert e["run"]["status"] == e["kwargs"]["status"]
        assert not e["run"]["leased"]
        assert isinstance(e["kwargs"]["due_at"], float)

    assert [e["kwargs"]["attempt"] for e in resumed] == [1, 2]
    for e in resumed:
        assert e["kwargs"]["endpoint"] == "flow"
        assert e["run"]["status"] == "running" and e["run"]["leased"]
        assert e["run"]["attempt"] == e["kwargs"]["attempt"]

    completed = by[("run_completed", None)]
    assert completed["kwargs"]["endpoint"] == "flow"
    assert completed["run"]["status"] == "completed" and completed["run"]["response"]

    writer = {k for k, e in by.items() if e["thread"] == WRITER_THREAD}
    if checkpoint == "async":
        # Receivers run on the writer thread, after the batch commit.
        assert {
            ("run_started", None),
            ("step_completed", "past"),
            ("step_completed", "ok"),
            ("step_completed", "flaky"),
            ("step_completed", "nap"),
            ("step_completed", "after"),
            ("run_completed", None),
        } <= writer
    else:
        assert writer == set()


def test_signals_of_a_run_that_fails(
    recorded: Any, live_server: Any, checkpoint: str
) -> None:
    app, recorder, raised = recorded
    r = live_server(app).post("/doomed")
    assert r.status_code == 500
    run_id = r.headers["Durable-Run-Id"]
    entries = recorder.wait_for(run_id, "run_failed")
    check_common(app, entries)
    assert sequence(entries) == [
        ("run_started", None),
        ("step_failed", "bad"),
        ("run_suspended", None),
        ("run_resumed", None),
        ("step_failed", "bad"),
        ("run_failed", None),
    ]
    started, first, _, _, final, failed = entries
    assert started["run"]["status"] == "scheduled"  # stored by the suspension
    assert first["kwargs"]["final"] is False and first["kwargs"]["attempt"] == 0
    assert first["kwargs"]["error"] is raised["bad"][0]
    assert first["step"] == "error"
    assert final["kwargs"]["final"] is True and final["kwargs"]["attempt"] == 1
    assert final["kwargs"]["error"] is raised["bad"][1]
    assert final["step"] == "failed"
    assert len(raised["bad"]) == 2
    assert failed["kwargs"]["status"] == "failed"
    assert failed["kwargs"]["endpoint"] == "doomed"
    assert failed["run"]["status"] == "failed" and failed["run"]["response"]
    if checkpoint == "async":
        assert final["thread"] == WRITER_THREAD
        assert failed["thread"] == WRITER_THREAD


def test_finished_sleep_is_announced_with_the_final_response(
    recorded: Any, live_server: Any
) -> None:
    app, recorder, _ = recorded
    r = live_server(app).post("/nap")
    assert r.status_code == 200 and r.json() == {"woke": True}
    run_id = r.headers["Durable-Run-Id"]
    entries = recorder.wait_for(run_id, "run_completed")
    check_common(app, entries)
    assert sequence(entries) == [
        ("run_started", None),
        ("run_suspended", None),
        ("run_resumed", None),
        ("step_completed", "nap"),
        ("run_completed", None),
    ]
    started, suspended, _, nap, completed = entries
    assert started["run"]["status"] == "sleeping"
    assert suspended["kwargs"]["status"] == "sleeping"
    # Written with the final response, and announced after it.
    assert nap["step"] == "completed"
    assert nap["run"]["status"] == "completed" and nap["run"]["response"]
    assert completed["run"]["status"] == "completed"


def test_cancelled_run_is_announced_by_run_failed(
    recorded: Any, live_server: Any
) -> None:
    app, recorder, _ = recorded
    server = live_server(app)
    for path in ("/long", "/later"):
        r = server.post(path, allow_redirects=False)
        assert r.status_code == 303
        run_id = r.headers["Durable-Run-Id"]
        with app.app_context():
            assert durable.cancel(run_id) is True
        entries = recorder.wait_for(run_id, "run_failed")
        check_common(app, entries)
        failed = entries[-1]
        assert failed["signal"] == "run_failed"
        assert failed["kwargs"]["status"] == "cancelled"
        assert failed["kwargs"]["endpoint"] == path[1:]
        assert failed["run"]["status"] == "cancelled" and failed["run"]["response"]
        assert server.get(r.headers["Location"]).status_code == 409
