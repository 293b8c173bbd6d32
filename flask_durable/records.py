"""Typed records: what crosses a module boundary.

Rows read from the store (:class:`Claim`, :class:`StepRecord`,
:class:`WaitSpec`, :class:`FinalState`), the run that is not stored yet
(:class:`NewRun`), and the write intents a run's execution hands to its
committer (:class:`Checkpoint`, :class:`Suspension`, :class:`Finish`).

The public read-only views returned by :meth:`Durable.get_run
<flask_durable.Durable.get_run>` (:class:`RunInfo`, :class:`StepInfo`) and
the run statuses (:class:`RunStatus`) live here too.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from .durations import to_datetime
from .serde import load_json, load_value


class RunStatus(str, enum.Enum):
    """The status of a run. Compares equal to its string value
    (``RunStatus.COMPLETED == "completed"``)."""

    #: Executing in a process now (its lease is held).
    RUNNING = "running"
    #: Due again at ``due_at``: a step will be retried, or the run waits for
    #: a process that has its handler.
    SCHEDULED = "scheduled"
    #: In ``step.sleep`` or ``step.sleep_until``.
    SLEEPING = "sleeping"
    #: In ``step.wait_for_event``.
    WAITING = "waiting"
    #: Waiting for a slot under a flow-control limit.
    QUEUED = "queued"
    #: Finished with the view's response.
    COMPLETED = "completed"
    #: Finished because the view raised (its error response is stored).
    FAILED = "failed"
    #: Cancelled or timed out.
    CANCELLED = "cancelled"

    def __str__(self) -> str:
        return self.value

    @property
    def is_terminal(self) -> bool:
        """Whether the run is finished (its final response is stored)."""
        return self.value in TERMINAL_STATUSES


#: The values of the statuses of a finished run.
TERMINAL_STATUSES = frozenset({"completed", "failed", "cancelled"})

#: Step statuses as stored (plain strings on the hot path).
STEP_RUNNING = "running"
#: A failed attempt; retried at ``due_at``.
STEP_ERROR = "error"
STEP_SLEEPING = "sleeping"
STEP_WAITING = "waiting"
STEP_COMPLETED = "completed"
#: Failed for good (retries exhausted, non-retriable, over a limit).
STEP_FAILED = "failed"


class StepRecord:
    """What the database knows of one step of a run. Mutable: an execution
    updates it as the step runs, then hands it to its committer."""

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
        "history",
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
        history: str | None = None,
    ) -> None:
        self.step_id = step_id
        self.seq = seq
        self.status = status
        self.attempts = attempts
        #: The stored value (tagged JSON), once completed.
        self.output = output
        #: ``[type, message]`` (JSON) of the last failed attempt.
        self.error = error
        self.due_at = due_at
        self.started_at = started_at
        self.finished_at = finished_at
        #: Every failed attempt (JSON list of objects), kept after success.
        self.history = history

    def __repr__(self) -> str:
        return f"<StepRecord {self.step_id!r} {self.status}>"


@dataclass(slots=True)
class NewRun:
    """A run whose row is not written yet: it is inserted with its first
    write (checkpoint, suspension or final response)."""

    id: str
    app_id: str
    endpoint: str
    created_at: float
    deadline: float | None
    owner: str
    request: bytes
    idempotency_key: str | None = None
    request_hash: str | None = None
    idempotency_expires_at: float | None = None
    #: The limit key, for a run under a concurrency or throttle limit.
    flow_key: str | None = None


@dataclass(slots=True)
class Claim:
    """A run this process has just taken the lease of, with what a replay
    needs (no further query)."""

    id: str
    owner: str
    version: int
    attempt: int
    deadline: float | None
    cancel_requested: bool
    endpoint: str
    request: bytes
    #: When the lease was taken, by this process's ``time.monotonic()``.
    claimed_at: float


@dataclass(slots=True)
class WaitSpec:
    """A ``step.wait_for_event`` registration."""

    step_id: str
    event: str
    #: ``match`` as JSON.
    match: str
    since: float
    expires_at: float


@dataclass(slots=True)
class FinalState:
    """What the wait URL needs of a run."""

    status: str
    response: bytes | None


@dataclass(slots=True)
class Checkpoint:
    """Steps of a run reached a final state (completed or failed for
    good); written fenced on the run's lease."""

    run_id: str
    owner: str
    inserts: list[StepRecord]
    updates: list[StepRecord]
    #: The run itself, when this is its first write.
    new_run: NewRun | None = None


@dataclass(slots=True)
class Suspension:
    """A run stops executing until ``due_at`` (a retry, a sleep, a wait):
    its pending steps and waits are written and its lease released."""

    run_id: str
    owner: str
    version: int
    status: str
    due_at: float
    inserts: list[StepRecord]
    updates: list[StepRecord]
    waits: list[WaitSpec]
    new_run: NewRun | None = None


@dataclass(slots=True)
class Finish:
    """A run is terminal: its final response is stored and its lease
    released."""

    run_id: str
    owner: str
    status: str
    response: bytes
    error: str | None
    inserts: list[StepRecord] = field(default_factory=list)
    updates: list[StepRecord] = field(default_factory=list)
    new_run: NewRun | None = None
    #: ``False`` when the run never waited for an event (no rows to delete).
    waits_possible: bool = True
    #: Tell other processes (PostgreSQL ``NOTIFY``): only needed when a
    #: client can be waiting for the run.
    notify: bool = True


@dataclass(frozen=True)
class StepInfo:
    """One step of a run, as :meth:`Durable.get_run
    <flask_durable.Durable.get_run>` reports it.

    :ivar attempt_errors: every failed attempt, oldest first: dicts with
        ``attempt`` (0-based), ``type``, ``message`` and ``at`` (a
        :class:`~datetime.datetime`), kept after the step succeeded.
    """

    id: str
    status: str
    attempts: int
    output: Any
    error: dict[str, str] | None
    started_at: datetime | None
    finished_at: datetime | None
    due_at: datetime | None
    attempt_errors: list[dict[str, Any]] = field(default_factory=list)

    @classmethod
    def from_record(cls, rec: StepRecord) -> StepInfo:
        """The public view of a stored step."""
        error = None
        if rec.error:
            error_type, message = load_json(rec.error)
            error = {"type": error_type, "message": message}
        history = load_json(rec.history) if rec.history else []
        for entry in history:
            entry["at"] = to_datetime(entry["at"])
        return cls(
            id=rec.step_id,
            status=rec.status,
            attempts=rec.attempts,
            output=load_value(rec.output) if rec.output is not None else None,
            error=error,
            started_at=to_datetime(rec.started_at),
            finished_at=to_datetime(rec.finished_at),
            due_at=to_datetime(rec.due_at),
            attempt_errors=history,
        )


@dataclass(frozen=True)
class RunInfo:
    """A read-only view of a run (:meth:`Durable.get_run
    <flask_durable.Durable.get_run>`).

    ``response`` is ``(status_code, headers, body)`` once the run is
    terminal, else ``None``. ``request`` is the stored request as people may
    read it (:func:`~flask_durable.replay.describe_request`: credentials
    masked), or ``None`` when it cannot be decrypted.
    """

    id: str
    endpoint: str
    status: RunStatus
    attempt: int
    steps: list[StepInfo]
    created_at: datetime | None
    finished_at: datetime | None
    due_at: datetime | None
    error: str | None
    response: tuple[int, list[tuple[str, str]], bytes] | None
    request: dict[str, Any] | None = None
    updated_at: datetime | None = None
    #: For a run of a durable function: the event that started it.
    event: dict[str, Any] | None = None
    #: For a completed run of a durable function: what it returned.
    output: Any = None

    @property
    def is_terminal(self) -> bool:
        return self.status.is_terminal


@dataclass(frozen=True)
class RunSummary:
    """One run as :meth:`Durable.list_runs <flask_durable.Durable.list_runs>`
    lists it: :class:`RunInfo` without its steps and response.
    """

    id: str
    endpoint: str
    status: RunStatus
    attempt: int
    created_at: datetime | None
    updated_at: datetime | None
    finished_at: datetime | None
    due_at: datetime | None
    error: str | None

    @property
    def is_terminal(self) -> bool:
        return self.status.is_terminal


@dataclass(frozen=True, slots=True)
class CurrentRun:
    """What :data:`current_run` exposes inside a durable view.

    :ivar id: the run id (also in the ``Durable-Run-Id`` header).
    :ivar attempt: how many times the run was resumed before this execution
        (0 for the original request).
    :ivar is_replay: ``True`` when this execution is a replay.
    :ivar endpoint: the endpoint's stable id.
    """

    id: str
    attempt: int
    is_replay: bool
    endpoint: str


class CurrentStep:
    """What :data:`current_step` exposes inside a step function (read-only).

    :ivar id: the step's id in this run (``"fetch"``, ``"fetch:1"``, ...).
    :ivar attempt: 0 on the first attempt, 1 on the first retry, ...
    :ivar run_id: the run's id.
    """

    __slots__ = ("_id", "_attempt", "_run_id")

    def __init__(self, id: str, attempt: int, run_id: str) -> None:
        self._id = id
        self._attempt = attempt
        self._run_id = run_id

    @property
    def id(self) -> str:
        return self._id

    @property
    def attempt(self) -> int:
        return self._attempt

    @property
    def run_id(self) -> str:
        return self._run_id

    @property
    def idempotency_key(self) -> str:
        """Stable for this run and step across retries and crashes: pass it
        to payment and other idempotent APIs."""
        return f"{self._run_id}:{self._id}"

    def __repr__(self) -> str:
        return f"<CurrentStep {self._id!r} attempt={self._attempt}>"


@dataclass(frozen=True, slots=True)
class Backlog:
    """The unfinished runs of an app, as the metrics read them at each
    scrape (:meth:`Store.backlog <flask_durable.store.base.Store.backlog>`).

    :ivar by_status: how many unfinished runs have each status (statuses
        without runs are left out).
    :ivar due: runs due now that no process holds (their lease is free or
        expired): work waiting for a worker.
    :ivar oldest_due_at: since when (POSIX time) the longest waiting of
        those has been due, or ``None``.
    """

    by_status: dict[str, int]
    due: int
    oldest_due_at: float | None
