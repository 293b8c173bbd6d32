"""The context of a run and of a step, held in :mod:`contextvars`.

:data:`current_run` and :data:`current_step` are proxies to the objects of
this module, as :data:`flask.request` is to the request context.
"""

from __future__ import annotations

import threading
import time
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any, cast

from werkzeug.local import LocalProxy

from . import signals
from .errors import (
    StepError,
    StepNestingError,
    _Cancelled,
    _LeaseLost,
    _StoreUnavailable,
)
from .serde import dump_json
from .store import UNAVAILABLE

if TYPE_CHECKING:
    from .runtime import _State

_cv_run: ContextVar[RunContext] = ContextVar("flask_durable.run")
_cv_step: ContextVar[StepContext] = ContextVar("flask_durable.step")

current_run: RunContext = cast(
    "RunContext",
    LocalProxy(
        _cv_run, unbound_message="current_run is only set inside a durable view."
    ),
)
current_step: StepContext = cast(
    "StepContext",
    LocalProxy(
        _cv_step, unbound_message="current_step is only set inside a step function."
    ),
)

_MAX_STEP_ID = 200


class StepRecord:
    """What the database knows of one step of a run."""

    __slots__ = (
        "step_id",
        "seq",
        "status",
        "attempts",
        "output",
        "error",
        "due_at",
        "started_at",
        "finished_at",
    )

    def __init__(
        self,
        step_id: str,
        seq: int,
        status: str,
        attempts: int = 0,
        output: str | None = None,
        error: str | None = None,
        due_at: float | None = None,
        started_at: float = 0.0,
        finished_at: float | None = None,
    ) -> None:
        self.step_id = step_id
        self.seq = seq
        self.status = status
        self.attempts = attempts
        self.output = output
        self.error = error
        self.due_at = due_at
        self.started_at = started_at
        self.finished_at = finished_at

    def row(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.__slots__}


class StepContext:
    """What :data:`current_step` exposes inside a step function.

    :ivar id: the step's id in this run (``"fetch"``, ``"fetch:1"``, ...).
    :ivar attempt: 0 on the first attempt, 1 on the first retry, ...
    :ivar idempotency_key: stable for this run and step across retries and
        crashes; pass it to payment and other idempotent APIs.
    """

    __slots__ = ("id", "attempt", "run_id")

    def __init__(self, step_id: str, attempt: int, run_id: str) -> None:
        self.id = step_id
        self.attempt = attempt
        self.run_id = run_id

    @property
    def idempotency_key(self) -> str:
        return f"{self.run_id}:{self.id}"

    def __repr__(self) -> str:
        return f"<StepContext {self.id!r} attempt={self.attempt}>"


class RunContext:
    """One execution of a durable run: what :data:`current_run` exposes,
    plus the memo of its steps and the writes it has pending.

    :ivar id: the run id (also in the ``Durable-Run-Id`` header).
    :ivar attempt: how many times the run was resumed before this
        execution (0 for the original request).
    :ivar is_replay: ``True`` when this execution is a replay.
    :ivar endpoint: the endpoint's stable id.
    """

    def __init__(
        self,
        state: _State,
        *,
        run_id: str,
        endpoint: str,
        owner: str,
        version: int,
        attempt: int,
        retries: int,
        deadline: float | None,
        records: list[StepRecord],
        new_run: dict[str, Any] | None,
        async_checkpoints: bool = False,
    ) -> None:
        self.state = state
        self.async_checkpoints = async_checkpoints
        self.id = run_id
        self.endpoint = endpoint
        self.owner = owner
        self.version = version
        self.attempt = attempt
        self.is_replay = new_run is None and attempt > 0
        self.retries = retries
        self.deadline = deadline
        self.memo = {r.step_id: r for r in records}
        self.stored = set(self.memo)
        self.state_size = sum(len(r.output or "") for r in records)
        self.seq = max((r.seq for r in records), default=-1) + 1
        self.new_run = new_run
        #: Whether the run's row is committed (its lease can be renewed).
        self.in_db = new_run is None
        #: Whether the run was stored before this execution: only then can
        #: a client be waiting for it (wait URL, Idempotency-Key repeat).
        self.preexisting = new_run is None
        self.counts: dict[str, int] = {}
        self.lock = threading.RLock()
        self.pending: dict[str, StepRecord] = {}
        #: Sleeps that are over: completed without running anything, and
        #: written with the run's next write.
        self.settled: list[StepRecord] = []
        self.pending_waits: list[dict[str, Any]] = []
        self.cancel_reason: str | None = None
        #: Whether this execution registered a wait (rows to clean up).
        self.waited = False
        self.outcome: str | None = None
        self.error: str | None = None
        #: Set while the final response is being written: the heartbeat
        #: leaves the run alone (its lease ends with that write).
        self.finishing = False
        #: Until when (``time.monotonic()``) this process may start a step
        #: without asking the database whether it still holds the lease.
        self.lease_deadline = time.monotonic() + self.lease_trust

    def __repr__(self) -> str:
        return f"<RunContext {self.id} attempt={self.attempt}>"

    # -- ids and boundaries --------------------------------------------------

    def unique_id(self, step_id: str) -> str:
        """The id a step gets in this run: repeated ids get ``:1``, ``:2``."""
        if not isinstance(step_id, str) or not step_id:
            raise TypeError(f"a step id must be a non-empty string, not {step_id!r}")
        if len(step_id) > _MAX_STEP_ID:
            raise ValueError(f"step id is longer than {_MAX_STEP_ID} characters")
        with self.lock:
            n = self.counts.get(step_id, 0)
            self.counts[step_id] = n + 1
        return step_id if n == 0 else f"{step_id}:{n}"

    @property
    def lease_trust(self) -> float:
        """Seconds a lease taken or renewed now may be relied on by this
        process's own clock: two thirds of the lease, so that a renewal
        (every third of it) keeps the trust alive, and a margin is left for
        clocks that differ between hosts."""
        return self.state.lease_seconds * (2.0 / 3.0)

    def boundary(self) -> None:
        """Stop here if the run was cancelled, passed its deadline, or may
        belong to another process by now.

        A process that was stalled (``SIGSTOP``, a paused VM, swapping)
        longer than its lease may have lost the run to another process
        without its heartbeat having noticed yet: if the last renewal is
        older than :attr:`lease_trust`, the lease is renewed here, fenced
        on the owner, before a step may start.
        """
        if self.cancel_reason is None and self.deadline is not None:
            if time.time() >= self.deadline:
                self.cancel_reason = "timeout"
        if (
            self.cancel_reason is None
            and self.in_db
            and time.monotonic() >= self.lease_deadline
        ):
            self.confirm_lease()
        if self.cancel_reason == "lost":
            raise _LeaseLost(self.id)
        if self.cancel_reason is not None:
            raise _Cancelled(self.cancel_reason)

    def confirm_lease(self) -> None:
        """Renew the lease now; mark the run lost if another process has
        taken it."""
        started = time.monotonic()
        try:
            held = self.state.store.renew_one(self.id, self.owner)
        except UNAVAILABLE as e:
            raise _StoreUnavailable(e) from e
        if held:
            self.lease_renewed(started)
        else:
            self.cancel_reason = "lost"

    def lease_renewed(self, at: float) -> None:
        """The lease was taken or renewed by a write that began at ``at``
        (``time.monotonic()``)."""
        self.lease_deadline = max(self.lease_deadline, at + self.lease_trust)

    def next_record(self, step_id: str, status: str) -> StepRecord:
        """The record of ``step_id`` (a new one if the step never ran)."""
        rec = self.memo.get(step_id)
        if rec is None:
            with self.lock:
                rec = StepRecord(step_id, self.seq, status, started_at=time.time())
                self.seq += 1
        return rec

    # -- writes ---------------------------------------------------------------

    def _split(
        self, records: list[StepRecord]
    ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        inserts = [r.row() for r in records if r.step_id not in self.stored]
        updates = [r.row() for r in records if r.step_id in self.stored]
        return inserts, updates

    def checkpoint(self, rec: StepRecord) -> None:
        """Commit one step's final state (completed or failed for good)."""
        with self.lock:
            if rec.status == "completed":
                size = self.state_size + len(rec.output or "")
                if size > self.state.max_run_state:
                    rec.status = "failed"
                    rec.output = None
                    rec.error = dump_json(
                        [
                            "ValueError",
                            f"the run's stored state would be {size} bytes, over"
                            f" DURABLE_MAX_RUN_STATE ({self.state.max_run_state})",
                        ]
                    )
                else:
                    self.state_size = size
            self.pending.pop(rec.step_id, None)
            # Sleeps that are over go with it (see settle()).
            records = [*self.settled, rec]
            self.settled = []
            inserts, updates = self._split(records)
            item: dict[str, Any] = {
                "kind": "checkpoint",
                "run_id": self.id,
                "owner": self.owner,
                "inserts": inserts,
                "updates": updates,
                "new_run": self.new_run,
            }
            writer = self.state.writer
            if self.async_checkpoints:
                if self.new_run:
                    item["after"] = self._mark_stored
                    self.lease_renewed(time.monotonic())
                else:
                    item["after"] = None
                writer.submit(self, item)
            else:
                started = time.monotonic()
                try:
                    if self.state.group_commit:
                        committed = writer.commit(self, item)
                    else:
                        committed = writer.write_now(item)
                except UNAVAILABLE as e:
                    raise _StoreUnavailable(e) from e
                if not committed:
                    raise _LeaseLost(self.id)
                if not self.in_db:
                    self.lease_renewed(started)  # the row and its lease began
                self.in_db = True
            self.new_run = None
            self.stored.update(r.step_id for r in records)
            self.memo[rec.step_id] = rec
        if rec.status == "completed":
            if signals.step_completed.receivers:
                signals.step_completed.send(
                    self.state.app, run_id=self.id, step_id=rec.step_id
                )
        elif signals.step_failed.receivers:
            signals.step_failed.send(
                self.state.app, run_id=self.id, step_id=rec.step_id, final=True
            )

    def settle(self, rec: StepRecord) -> None:
        """Record a sleep that is over. It is written with the run's next
        checkpoint, suspension or final response, which saves a commit; if
        the process dies first, the replay completes it again, with the
        same result. (A wait that timed out is committed at once instead:
        an event could be delivered to it meanwhile.)"""
        with self.lock:
            self.pending.pop(rec.step_id, None)
            self.settled.append(rec)
            self.memo[rec.step_id] = rec
        if signals.step_completed.receivers:
            signals.step_completed.send(
                self.state.app, run_id=self.id, step_id=rec.step_id
            )

    def _mark_stored(self) -> None:
        self.in_db = True

    def park(self, rec: StepRecord, wait: dict[str, Any] | None = None) -> None:
        """Keep a step's non-final state (retry pending, sleeping, waiting)
        to be written when the run suspends."""
        with self.lock:
            self.pending[rec.step_id] = rec
            self.memo[rec.step_id] = rec
            if wait is not None:
                self.pending_waits.append(wait)
                self.waited = True

    def take_pending(
        self,
    ) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]]]:
        if not self.pending and not self.pending_waits and not self.settled:
            return [], [], []
        with self.lock:
            records = [*self.settled, *self.pending.values()]
            waits = self.pending_waits
            self.pending = {}
            self.pending_waits = []
            self.settled = []
            inserts, updates = self._split(records)
            self.stored.update(r.step_id for r in records)
        return inserts, updates, waits

    def request_cancel(self, reason: str = "cancelled") -> None:
        if self.cancel_reason is None:
            self.cancel_reason = reason


def raise_for_failed(rec: StepRecord) -> None:
    """Raise the :class:`StepError` a failed step stands for."""
    from .serde import load_json

    error_type, message = load_json(rec.error or '["Error", ""]')
    raise StepError(rec.step_id, error_type, message)


def get_run_context(what: str) -> RunContext:
    """The current run, or a clear :class:`RuntimeError`."""
    try:
        ctx = _cv_run.get()
    except LookupError:
        raise RuntimeError(
            f"{what} can only be called inside a view decorated with"
            " @durable.endpoint (or in a step.parallel branch of one)."
        ) from None
    if _cv_step.get(None) is not None:
        raise StepNestingError(
            f"{what} cannot be called inside a step function: steps do not nest."
        )
    return ctx
