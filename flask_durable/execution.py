"""One execution of a run: the memo of its steps, the writes it has
pending, its lease, and the signals its writes announce.

An :class:`Execution` lives for one pass through the view (the original
request or a replay). It knows its collaborators narrowly: the run's
:class:`~flask_durable.commit.Committer`, the :class:`~flask_durable.config.Config`,
a function renewing its lease, and the app (the sender of signals).
"""

from __future__ import annotations

import logging
import threading
import time
import traceback
from collections.abc import Callable
from contextvars import ContextVar
from typing import Any, Protocol

from . import clock, signals
from .commit import Committer
from .config import Config
from .crypto import STEP_CONTEXT, Cipher, DecryptionError, is_sealed_text
from .errors import StepError, _Cancelled, _Interrupt, _LeaseLost, _StoreUnavailable
from .records import (
    STEP_COMPLETED,
    STEP_ERROR,
    STEP_FAILED,
    STEP_RUNNING,
    Checkpoint,
    CurrentRun,
    NewRun,
    StepRecord,
    WaitSpec,
)
from .serde import dump_json, is_storable_text, load_json, load_value
from .store import UNAVAILABLE

log = logging.getLogger("flask_durable")

#: Set inside the branches of ``step.parallel``, whose control-flow signals
#: are caught by ``step.parallel`` itself.
_cv_branch: ContextVar[bool] = ContextVar("flask_durable.branch", default=False)

_MAX_STEP_ID = 200
#: Failed attempts kept per step (the oldest are dropped).
_MAX_HISTORY = 50
_MAX_TRACEBACK = 8000


class StepObserver(Protocol):
    """Told when a step attempt starts and ends (metrics and tracing, see
    :mod:`flask_durable.observability`). Both calls happen in the thread,
    and the context, that runs the attempt."""

    def attempt_started(self, ex: Execution, rec: StepRecord) -> None: ...

    def attempt_ended(
        self,
        ex: Execution,
        rec: StepRecord,
        error: BaseException | None,
        will_retry: bool,
    ) -> None: ...


class StepHooks(Protocol):
    """Changes what ``step.run`` does, for tests
    (:class:`flask_durable.testing.DurableTester`)."""

    def step_function(
        self, ex: Execution, step_id: str, fn: Callable[..., Any]
    ) -> Callable[..., Any]:
        """The function to call for an attempt of ``step_id``."""
        ...

    def step_committed(self, ex: Execution, step_id: str) -> None:
        """Called once ``step_id``'s result is checkpointed."""
        ...


#: Calls a durable view for an execution: ``(ex, view, args, kwargs)``
#: (:mod:`flask_durable.observability` runs it in a span).
ViewCaller = Callable[["Execution", Callable[..., Any], Any, Any], Any]


class Execution:
    """The engine's state for one execution of a run (private; views see
    :class:`~flask_durable.records.CurrentRun`)."""

    def __init__(
        self,
        *,
        run_id: str,
        endpoint: str,
        owner: str,
        version: int,
        attempt: int,
        deadline: float | None,
        records: list[StepRecord],
        new_run: NewRun | None,
        retries: int,
        committer: Committer,
        config: Config,
        renew: Callable[[str, str], bool],
        sender: Any,
        cipher: Cipher | None = None,
        seal_outputs: bool = False,
        observer: StepObserver | None = None,
        hooks: StepHooks | None = None,
    ) -> None:
        self.id = run_id
        self.endpoint = endpoint
        self.owner = owner
        self.version = version
        self.attempt = attempt
        self.deadline = deadline
        self.retries = retries
        self.committer = committer
        self.config = config
        self._renew = renew
        #: The sender of signals (the Flask app).
        self.sender = sender
        #: Opens sealed step outputs; seals new ones with ``seal_outputs``
        #: (``DURABLE_ENCRYPT_PAYLOADS``).
        self.cipher = cipher
        self.seal_outputs = seal_outputs and cipher is not None
        is_replay = new_run is None and attempt > 0
        self.public = CurrentRun(run_id, attempt, is_replay, endpoint)
        #: While a replay runs code an earlier execution already ran: until a
        #: step does new work or the view passes the last step stored
        #: (``durable.logger`` drops records meanwhile).
        self.replaying = is_replay and bool(records)
        self._frontier = (
            max(records, key=lambda r: r.seq).step_id if self.replaying else None
        )
        #: Told of each step attempt (``DURABLE_METRICS``, ``DURABLE_OTEL``).
        self.observer = observer
        #: Test hooks (:class:`flask_durable.testing.DurableTester`).
        self.hooks = hooks
        self.memo = {r.step_id: r for r in records}
        self.stored = set(self.memo)
        self.state_size = sum(len(r.output or "") for r in records)
        self.seq = max((r.seq for r in records), default=-1) + 1
        self.new_run = new_run
        #: Whether the run's row is committed (its lease can be renewed).
        self.in_db = new_run is None
        #: Whether the run was stored before this execution: only then can a
        #: client be waiting for it (wait URL, Idempotency-Key repeat).
        self.preexisting = new_run is None
        self.counts: dict[str, int] = {}
        self.lock = threading.RLock()
        self.pending: dict[str, StepRecord] = {}
        #: Sleeps that are over: completed without running anything, and
        #: written with the run's next write.
        self.settled: list[StepRecord] = []
        self.pending_waits: list[WaitSpec] = []
        #: The exception of each step's last failed attempt (for signals).
        self.exceptions: dict[str, BaseException] = {}
        self.cancel_reason: str | None = None
        #: Whether this execution registered a wait (rows to clean up).
        self.waited = False
        self.outcome: str | None = None
        self.error: str | None = None
        #: The control-flow signal last raised to the view, until it left
        #: the view (a view that swallows one gets a clear error).
        self.interrupt: _Interrupt | None = None
        #: Publishes this run's stream events (``step.stream``), once used.
        self.publisher: Any = None
        #: Set once the final response is handed to the committer: a lease
        #: the heartbeat finds gone then ended with that write.
        self.finishing = False
        #: Seconds a lease taken or renewed now may be relied on by this
        #: process's own clock: two thirds of the lease, so that the
        #: heartbeat (every third of it) keeps the trust alive, with a margin
        #: for clocks that differ between hosts.
        self.lease_trust = config.lease_seconds * (2.0 / 3.0)
        #: Until when (``time.monotonic()``) this process may start a step
        #: without asking the database whether it still holds the lease.
        self.lease_deadline = time.monotonic() + self.lease_trust
        #: Called once the run's row is first committed (``run_started``).
        self.on_stored: Callable[[], None] | None = None

    def stored_output(self, text: str) -> str:
        """A step output as it is stored: sealed with
        ``DURABLE_ENCRYPT_PAYLOADS``."""
        if self.seal_outputs and self.cipher is not None:
            return self.cipher.encrypt_text(text, STEP_CONTEXT)
        return text

    def load_output(self, text: str | None) -> Any:
        """The value of a stored step output (decrypted if it was sealed).

        :raises DecryptionError: no key opens it.
        """
        if text is None:
            return None
        if is_sealed_text(text):
            if self.cipher is None:
                raise DecryptionError("step output is encrypted and no key was given")
            text = self.cipher.decrypt_text(text, STEP_CONTEXT)
        return load_value(text)

    def __repr__(self) -> str:
        return f"<Execution {self.id} attempt={self.attempt}>"

    @property
    def is_replay(self) -> bool:
        return self.public.is_replay

    # -- control flow -------------------------------------------------------

    def interrupted(self, signal: _Interrupt) -> _Interrupt:
        """Remember a control-flow signal on its way to the view; returns
        it (``raise ex.interrupted(_Suspend(...))``). Signals raised in a
        ``step.parallel`` branch are caught by ``step.parallel``, which
        raises one of its own to the view."""
        if not _cv_branch.get():
            self.interrupt = signal
        return signal

    def check_not_swallowed(self, what: str) -> None:
        """Refuse to go on after the view caught a control-flow signal."""
        if self.interrupt is not None:
            raise swallowed_error(self.interrupt, what)

    # -- ids and boundaries --------------------------------------------------

    def unique_id(self, step_id: str) -> str:
        """The id a step gets in this run: repeated ids get ``:1``, ``:2``."""
        if not isinstance(step_id, str) or not step_id:
            raise TypeError(f"a step id must be a non-empty string, not {step_id!r}")
        if len(step_id) > _MAX_STEP_ID:
            raise ValueError(f"step id is longer than {_MAX_STEP_ID} characters")
        if not is_storable_text(step_id) or step_id[0] == "\x1f":
            raise ValueError(
                "a step id cannot hold NUL or a lone surrogate, nor start with"
                f" \\x1f (reserved): {step_id!r}"
            )
        with self.lock:
            n = self.counts.get(step_id, 0)
            self.counts[step_id] = n + 1
        sid = step_id if n == 0 else f"{step_id}:{n}"
        if self.replaying and sid == self._frontier:
            self.replaying = False
        return sid

    def boundary(self) -> None:
        """Stop here if the run was cancelled, passed its deadline, or may
        belong to another process by now.

        A process that was stalled (``SIGSTOP``, a paused VM, swapping)
        longer than its lease may have lost the run to another process
        before its heartbeat noticed: if the last renewal is older than
        :attr:`lease_trust`, the lease is renewed here, fenced on the owner,
        before a step may start.
        """
        self.replaying = False  # new work begins here
        if self.cancel_reason is None and self.deadline is not None:
            if clock.now() >= self.deadline:
                self.cancel_reason = "timeout"
        if (
            self.cancel_reason is None
            and self.in_db
            and time.monotonic() >= self.lease_deadline
        ):
            self.confirm_lease()
        if self.cancel_reason == "lost":
            raise self.interrupted(_LeaseLost(self.id))
        if self.cancel_reason is not None:
            raise self.interrupted(_Cancelled(self.cancel_reason))

    def confirm_lease(self) -> None:
        """Renew the lease now; mark the run lost if another process has
        taken it."""
        started = time.monotonic()
        try:
            held = self._renew(self.id, self.owner)
        except UNAVAILABLE as e:
            raise self.interrupted(_StoreUnavailable(e)) from e
        if held:
            self.lease_renewed(started)
        else:
            self.cancel_reason = "lost"

    def lease_renewed(self, at: float) -> None:
        """The lease was taken or renewed by a write that began at ``at``
        (``time.monotonic()``)."""
        self.lease_deadline = max(self.lease_deadline, at + self.lease_trust)

    def request_cancel(self, reason: str = "cancelled") -> None:
        if self.cancel_reason is None:
            self.cancel_reason = reason

    def next_record(self, step_id: str, status: str) -> StepRecord:
        """The record of ``step_id`` (a new one if the step never ran)."""
        rec = self.memo.get(step_id)
        if rec is None:
            with self.lock:
                rec = StepRecord(step_id, self.seq, status, started_at=clock.now())
                self.seq += 1
        if self.observer is not None and status == STEP_RUNNING:
            self.observer.attempt_started(self, rec)
        return rec

    # -- failures -------------------------------------------------------------

    def attempt_failed(
        self, rec: StepRecord, error: BaseException, will_retry: bool
    ) -> None:
        """Record a failed attempt in the step's history and the log."""
        now = clock.now()
        entry = {
            "attempt": rec.attempts,
            "type": type(error).__name__,
            "message": str(error),
            "at": now,
            "traceback": "".join(
                traceback.format_exception(type(error), error, error.__traceback__)
            )[-_MAX_TRACEBACK:],
        }
        history = load_json(rec.history) if rec.history else []
        history.append(entry)
        rec.history = dump_json(history[-_MAX_HISTORY:])
        rec.attempts += 1
        rec.error = dump_json([entry["type"], entry["message"]])
        self.exceptions[rec.step_id] = error
        if self.observer is not None:
            self.observer.attempt_ended(self, rec, error, will_retry)
        log.warning(
            "run %s: step %r attempt %d failed (%s): %s: %s",
            self.id,
            rec.step_id,
            entry["attempt"],
            "will retry" if will_retry else "no retry left",
            entry["type"],
            entry["message"],
            exc_info=error,
        )

    # -- writes ---------------------------------------------------------------

    def _split(
        self, records: list[StepRecord]
    ) -> tuple[list[StepRecord], list[StepRecord]]:
        stored = self.stored
        if len(records) == 1:  # the common case: one step
            rec = records[0]
            return ([], records) if rec.step_id in stored else (records, [])
        inserts = [r for r in records if r.step_id not in stored]
        updates = [r for r in records if r.step_id in stored]
        return inserts, updates

    def checkpoint(self, rec: StepRecord) -> None:
        """Commit one step's final state (completed or failed for good)."""
        if self.observer is not None:
            self.observer.attempt_ended(self, rec, None, False)
        with self.lock:
            if rec.status == STEP_COMPLETED:
                size = self.state_size + len(rec.output or "")
                if size > self.config.max_run_state:
                    rec.status = STEP_FAILED
                    rec.output = None
                    rec.error = dump_json(
                        [
                            "ValueError",
                            f"the run's stored state would be {size} bytes, over"
                            f" DURABLE_MAX_RUN_STATE ({self.config.max_run_state})",
                        ]
                    )
                else:
                    self.state_size = size
            if self.pending:
                self.pending.pop(rec.step_id, None)
            # Sleeps that are over go with it (see settle()).
            if self.settled:
                records = [*self.settled, rec]
                self.settled = []
            else:
                records = [rec]
            inserts, updates = self._split(records)
            intent = Checkpoint(self.id, self.owner, inserts, updates, self.new_run)
            first = self.new_run is not None
            if first:
                # The row, and its lease, begin with this write.
                self.lease_renewed(time.monotonic())
            on_committed = (
                self._committed_callback(records, first)
                if first
                or signals.step_completed.receivers
                or signals.step_failed.receivers
                else None
            )
            try:
                self.committer.submit(intent, on_committed, self._lost)
            except UNAVAILABLE as e:
                raise self.interrupted(_StoreUnavailable(e)) from e
            if self.cancel_reason == "lost":
                raise self.interrupted(_LeaseLost(self.id))
            self.new_run = None
            for r in records:
                self.stored.add(r.step_id)
            self.memo[rec.step_id] = rec

    def _committed_callback(
        self, records: list[StepRecord], first: bool
    ) -> Callable[[], None]:
        def committed() -> None:
            if first:
                self.in_db = True
                self.run_stored()
            self.announce(records)

        return committed

    def _lost(self) -> None:
        self.request_cancel("lost")

    def run_stored(self) -> None:
        """The run's row was committed for the first time."""
        callback, self.on_stored = self.on_stored, None
        if callback is not None:
            callback()

    def announce(self, records: list[StepRecord]) -> None:
        """Send the signals of steps whose state was just committed."""
        for rec in records:
            if rec.status == STEP_COMPLETED:
                if signals.step_completed.receivers:
                    signals.step_completed.send(
                        self.sender, run_id=self.id, step_id=rec.step_id
                    )
            elif rec.status in (STEP_FAILED, STEP_ERROR):
                if signals.step_failed.receivers:
                    signals.step_failed.send(
                        self.sender,
                        run_id=self.id,
                        step_id=rec.step_id,
                        final=rec.status == STEP_FAILED,
                        attempt=max(rec.attempts - 1, 0),
                        error=self.exceptions.get(rec.step_id),
                    )

    def settle(self, rec: StepRecord) -> None:
        """Record a sleep that is over. It is written with the run's next
        checkpoint, suspension or final response, which saves a commit; if
        the process dies first, the replay completes it again, with the same
        result. (A wait that timed out is committed at once instead: an
        event could be delivered to it meanwhile.)"""
        with self.lock:
            self.pending.pop(rec.step_id, None)
            self.settled.append(rec)
            self.memo[rec.step_id] = rec

    def park(self, rec: StepRecord, wait: WaitSpec | None = None) -> None:
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
    ) -> tuple[list[StepRecord], list[StepRecord], list[WaitSpec], list[StepRecord]]:
        """What the run's suspension or final response writes besides
        itself: ``(inserts, updates, waits, all records)``."""
        if not (self.settled or self.pending or self.pending_waits):
            return [], [], [], []
        with self.lock:
            records = [*self.settled, *self.pending.values()]
            waits = self.pending_waits
            self.pending = {}
            self.pending_waits = []
            self.settled = []
            inserts, updates = self._split(records)
            self.stored.update(r.step_id for r in records)
        return inserts, updates, waits, records


def raise_for_failed(rec: StepRecord) -> None:
    """Raise the :class:`StepError` a failed step stands for."""
    error_type, message = load_json(rec.error or '["Error", ""]')
    raise StepError(rec.step_id, error_type, message)


def swallowed_error(signal: _Interrupt, what: str = "the view") -> RuntimeError:
    """The error for a view that caught one of flask-durable's control-flow
    signals (a bare ``except:`` or ``except BaseException:``)."""
    return RuntimeError(
        f"{what}: the view caught flask-durable's {type(signal).__name__[1:]}"
        " signal (a bare 'except:' or 'except BaseException:' around a step) and"
        " went on. Let it propagate: catch 'Exception' (or StepError) instead."
    )
