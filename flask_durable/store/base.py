"""The store: every query flask-durable makes, shared by both databases.

Rarely run queries use SQLAlchemy Core. The statements of the hot path
(checkpoints, suspensions, final responses, claims) are built once as SQL
text and run on the DB-API connection (several times cheaper); each dialect
(:mod:`.sqlite`, :mod:`.postgres`) owns its connection handling and the
statements that differ.
"""

from __future__ import annotations

import re
import secrets
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import IntegrityError

from .. import clock
from ..records import (
    Backlog,
    Checkpoint,
    Claim,
    FinalState,
    Finish,
    NewRun,
    StepRecord,
    Suspension,
    WaitSpec,
)
from .schema import (
    CLAIM_COLUMNS,
    SCHEMA_VERSION,
    STEP_COLUMNS,
    chunks,
    events,
    flow,
    meta,
    metadata,
    migrate,
    runs,
    steps,
    waits,
)

#: What a store call raises when the database cannot be used right now
#: (unreachable, locked, out of connections): answered with ``503``.
UNAVAILABLE: tuple[type[Exception], ...] = (sa.exc.DBAPIError, sa.exc.TimeoutError)

#: Channel carrying the ids of runs that just finished (PostgreSQL).
FINISHED_CHANNEL = "durable_finished"
#: Told the id of a run whose stream has new events.
STREAM_CHANNEL = "durable_stream"
#: Channel carrying the ids of runs that became due now (PostgreSQL).
WAKE_CHANNEL = "durable_wake"

_RUN_COLUMNS = tuple(c.name for c in runs.columns)
_STEP_INSERT_COLUMNS = ("run_id", *STEP_COLUMNS)
_SETTABLE_STEP_COLUMNS = tuple(c for c in STEP_COLUMNS if c != "step_id")
#: A ``:name`` parameter (not a PostgreSQL ``::`` cast).
_PARAMETER = re.compile(r"(?<!:):(\w+)")
#: The parameters of the finish statement (:meth:`Store._finish_row`).
_FINISH_ORDER = ("status", "response", "error", "now", "now", "id", "owner")


def _now() -> float:
    return clock.now()


class _Lost(Exception):
    """Raised inside a write transaction to roll it back: the lease is not
    ours."""


class Store:
    """Every database access of one app (and one app id).

    Use :func:`flask_durable.store.open_store` to get the subclass for a
    database URL.

    :param engine: the SQLAlchemy engine.
    :param app_id: the app id every row read or written belongs to.
    :param lease_seconds: how long a lease lasts.
    """

    def __init__(self, engine: Engine, app_id: str, lease_seconds: float) -> None:
        self.engine = engine
        self.app_id = app_id
        self.lease_seconds = lease_seconds
        self._read = engine.execution_options(durable_readonly=True)
        self._dbapi_error = engine.dialect.loaded_dbapi.Error
        self._claim_sql: dict[tuple[bool, int], str] = {}
        self._prepare()

    # -- dialect hooks ------------------------------------------------------

    def _sql(self, text: str) -> str:
        """SQL text with ``:name`` parameters in the driver's style."""
        return text

    #: The driver's positional parameter.
    _marker = "?"

    def _positional(self, text: str, order: Sequence[str]) -> str:
        """SQL text whose ``:name`` parameters, read left to right, are
        ``order``, with positional parameters: its values are given as a
        tuple in that order (binding by position skips a name lookup per
        value; the hot path's statements are written this way)."""
        found = _PARAMETER.findall(text)
        if tuple(found) != tuple(order):
            raise AssertionError(f"parameters {found} are not in the order {order}")
        return _PARAMETER.sub(lambda m: self._marker, text)

    def _writer_lock(self) -> AbstractContextManager[Any]:
        """Held around every write transaction of this process."""
        raise NotImplementedError

    def _raw(self, single: bool = False) -> AbstractContextManager[Any]:
        """A write transaction on a DB-API cursor; driver errors come out as
        :class:`~sqlalchemy.exc.DBAPIError`.

        :param single: the transaction is one statement (autocommit).
        """
        raise NotImplementedError

    def _execute_single(self, sql: str, params: Sequence[Any] | dict[str, Any]) -> int:
        """Run one write statement on its own; return its row count."""
        with self._raw(single=True) as cur:
            cur.execute(sql, params)
            return int(cur.rowcount)

    def _least(self, a: Any, b: Any) -> Any:
        raise NotImplementedError

    def _notify(self, conn: Connection, channel: str, payload: str) -> None:
        """Queue a notification sent when ``conn`` commits (if supported)."""

    def _notify_many(
        self, conn: Connection, channel: str, payloads: Sequence[str]
    ) -> None:
        """:meth:`_notify` for each payload (one statement where it can)."""
        for payload in payloads:
            self._notify(conn, channel, payload)

    #: Name of the store's background thread (``None``: it has none).
    thread_name: str | None = None

    def start_threads(self, on_notify: Callable[[str, str], None]) -> None:
        """Start the store's own background thread, once per process:
        PostgreSQL calls ``on_notify(channel, run_id)`` for runs finished
        or woken by other processes; SQLite checkpoints its WAL."""
        if self.thread_name is None:
            return
        self._thread_stop = threading.Event()
        self._thread: threading.Thread | None = threading.Thread(
            target=self._background,
            args=(on_notify, self._thread_stop),
            name=self.thread_name,
            daemon=True,
        )
        self._thread.start()

    def stop_threads(self) -> None:
        """Stop what :meth:`start_threads` started."""
        thread = getattr(self, "_thread", None)
        self._thread = None
        if thread is not None:
            self._thread_stop.set()
            thread.join(5)

    def forget_threads(self) -> None:
        """After ``fork()``: the parent's threads do not exist here."""
        self._thread = None

    def _background(
        self, on_notify: Callable[[str, str], None], stop: threading.Event
    ) -> None:
        """The body of the background thread, until ``stop`` is set."""

    # -- SQL built once -------------------------------------------------------

    def _prepare(self) -> None:
        sql = self._sql
        bind = self._positional
        step_cols = _STEP_INSERT_COLUMNS
        values = ", ".join(":" + c for c in _RUN_COLUMNS)
        self._sql_insert_run = bind(
            f"INSERT INTO durable_runs ({', '.join(_RUN_COLUMNS)}) VALUES ({values})",
            _RUN_COLUMNS,
        )
        self._sql_insert_step = bind(
            f"INSERT INTO durable_steps ({', '.join(step_cols)})"
            f" VALUES ({', '.join(':' + c for c in step_cols)})",
            step_cols,
        )
        # The step's values, then the WHERE clause's: see _step_row().
        sets = ", ".join(f"{c} = :{c}" for c in _SETTABLE_STEP_COLUMNS)
        self._sql_update_step = bind(
            f"UPDATE durable_steps SET {sets} WHERE run_id = :run_id"
            " AND step_id = :step_id",
            (*_SETTABLE_STEP_COLUMNS, "run_id", "step_id"),
        )
        # Written only while the lease is ours: the run_id inserted is the
        # fenced run's own id.
        self._sql_insert_step_fenced = bind(
            f"INSERT INTO durable_steps ({', '.join(STEP_COLUMNS)}, run_id)"
            f" SELECT {self._select_values(STEP_COLUMNS)}, id FROM durable_runs"
            " WHERE id = :run_id AND lease_owner = :owner",
            (*STEP_COLUMNS, "run_id", "owner"),
        )
        self._sql_update_step_fenced = bind(
            f"UPDATE durable_steps SET {sets} WHERE run_id = :run_id"
            " AND step_id = :step_id AND EXISTS (SELECT 1 FROM durable_runs"
            " WHERE id = durable_steps.run_id AND lease_owner = :owner)",
            (*_SETTABLE_STEP_COLUMNS, "run_id", "step_id", "owner"),
        )
        self._sql_fence = bind(
            "UPDATE durable_runs SET updated_at = :now"
            " WHERE id = :id AND lease_owner = :owner",
            ("now", "id", "owner"),
        )
        self._sql_renew = sql(
            "UPDATE durable_runs SET lease_expires_at = :expires"
            " WHERE id = :id AND lease_owner = :owner"
        )
        self._sql_finish = bind(self._finish_text(), _FINISH_ORDER)
        park = (
            "UPDATE durable_runs SET status = :status, due_at = :due,"
            " lease_owner = NULL, lease_expires_at = NULL, updated_at = :now"
            " WHERE id = :id AND lease_owner = :owner"
        )
        self._sql_park = sql(park + " AND version = :version")
        self._sql_park_woken = sql(park)
        wait_cols = [c.name for c in waits.columns]
        self._sql_insert_wait = sql(
            f"INSERT INTO durable_waits ({', '.join(wait_cols)})"
            f" VALUES ({', '.join(':' + c for c in wait_cols)})"
        )
        self._sql_load_steps = sql(
            f"SELECT {', '.join(STEP_COLUMNS)} FROM durable_steps"
            " WHERE run_id = :run_id ORDER BY seq"
        )
        self._sql_delete_waits = bind(
            "DELETE FROM durable_waits WHERE run_id = :id", ("id",)
        )

    def _select_values(self, columns: Sequence[str]) -> str:
        """The values of an ``INSERT ... SELECT`` (typed where needed)."""
        return ", ".join(":" + c for c in columns)

    @staticmethod
    def _finish_text(source: str = "") -> str:
        """The finish statement; its parameters are :data:`_FINISH_ORDER`."""
        return (
            "UPDATE durable_runs SET status = :status, response = :response,"
            " error = :error, finished_at = :now, updated_at = :now, due_at = NULL,"
            f" lease_owner = NULL, lease_expires_at = NULL{source}"
            " WHERE id = :id AND lease_owner = :owner"
        )

    def _claim_text(self, due: bool, n: int) -> str:
        """The claim statement for ``n`` registered endpoints: one run by id
        (``due=False``) or the earliest due runs."""
        key = (due, n)
        found = self._claim_sql.get(key)
        if found is not None:
            return found
        endpoints = ", ".join(f":e{i}" for i in range(n))
        free = "(lease_expires_at IS NULL OR lease_expires_at < :now)"
        # Runs under flow-control limits are started by admit() only.
        mine = f"app_id = :app_id AND endpoint IN ({endpoints}) AND flow_key IS NULL"
        take = (
            "UPDATE durable_runs SET lease_owner = :owner, lease_expires_at = :expires,"
            " status = 'running', attempt = attempt + 1, version = version + 1,"
            " updated_at = :now"
        )
        returning = f" RETURNING {', '.join(CLAIM_COLUMNS)}"
        if due:
            text = (
                f"{take} WHERE id IN (SELECT id FROM durable_runs"
                f" WHERE due_at <= :now AND {free} AND {mine}"
                f" ORDER BY due_at LIMIT :limit{self._skip_locked()})"
                f" AND due_at <= :now AND {free}{returning}"
            )
        else:
            text = (
                f"{take} WHERE id = :id AND due_at IS NOT NULL AND due_at <= :due"
                f" AND {free} AND {mine}{returning}"
            )
        found = self._claim_sql[key] = self._sql(text)
        return found

    def _skip_locked(self) -> str:
        return ""

    # -- parameters ------------------------------------------------------------

    def _run_row(
        self,
        run: NewRun,
        now: float,
        status: str = "running",
        due_at: float | None = None,
        *,
        leased: bool = True,
        response: bytes | None = None,
        error: str | None = None,
        finished_at: float | None = None,
    ) -> tuple[Any, ...]:
        """The row of a new run, in the order of its columns: running and
        leased (written with its first checkpoint), or parked or finished
        (``leased=False``)."""
        return (
            run.id,
            run.app_id,
            run.endpoint,
            status,
            0,  # attempt
            0,  # version
            run.created_at,
            now,  # updated_at
            finished_at,
            due_at,
            run.deadline,
            # The lease starts when the row is written, not when the request
            # began: a first step longer than the lease keeps its run.
            run.owner if leased else None,
            now + self.lease_seconds if leased else None,
            False,  # cancel_requested
            run.idempotency_key,
            run.request_hash,
            run.idempotency_expires_at,
            run.request,
            response,
            error,
            run.flow_key,
        )

    def _run_params(self, run: NewRun, now: float) -> dict[str, Any]:
        """The row of a new, running and leased run, by column name."""
        return dict(
            zip(
                _RUN_COLUMNS,
                self._run_row(run, now, due_at=run.created_at),
                strict=True,
            )
        )

    @staticmethod
    def _step_row(run_id: str, rec: StepRecord) -> tuple[Any, ...]:
        """A step's row, in the order of ``_STEP_INSERT_COLUMNS``."""
        return (
            run_id,
            rec.step_id,
            rec.seq,
            rec.status,
            rec.attempts,
            rec.output,
            rec.error,
            rec.due_at,
            rec.started_at,
            rec.finished_at,
            rec.history,
        )

    @staticmethod
    def _step_update(run_id: str, rec: StepRecord) -> tuple[Any, ...]:
        """The parameters of the step update statements (without the owner)."""
        return (
            rec.seq,
            rec.status,
            rec.attempts,
            rec.output,
            rec.error,
            rec.due_at,
            rec.started_at,
            rec.finished_at,
            rec.history,
            run_id,
            rec.step_id,
        )

    def _step_params(self, run_id: str, rec: StepRecord) -> dict[str, Any]:
        """A step's row by column name."""
        return dict(zip(_STEP_INSERT_COLUMNS, self._step_row(run_id, rec), strict=True))

    @staticmethod
    def _finish_row(f: Finish, now: float) -> tuple[Any, ...]:
        """The parameters of the finish statement (:data:`_FINISH_ORDER`)."""
        return (f.status, f.response, f.error, now, now, f.run_id, f.owner)

    # -- driver errors ------------------------------------------------------------

    def _connect(self) -> Any:
        """A pooled DB-API connection. Failing to open one (server down,
        too many connections, pool exhausted) is a
        :class:`~sqlalchemy.exc.DBAPIError` or
        :class:`~sqlalchemy.exc.TimeoutError` like any other store error."""
        try:
            return self.engine.raw_connection()
        except self._dbapi_error as e:
            raise self._wrap(e) from e

    def _discard(self, conn: Any, cur: Any, error: Any) -> BaseException:
        """Invalidate a connection a driver error came from; returns the
        error to raise."""
        disconnected = self.engine.dialect.is_disconnect(
            error, conn.dbapi_connection, cur
        )
        if conn.is_valid:
            conn.invalidate(error)
        if disconnected:
            # The server went away: the other pooled connections are dead too.
            # A fresh pool replaces them (checked-out ones close on return).
            self.engine.dispose()
        return self._wrap(error)

    def _wrap(self, error: Any) -> BaseException:
        """A driver error as SQLAlchemy's :class:`~sqlalchemy.exc.DBAPIError`."""
        return sa.exc.DBAPIError.instance(
            None, None, error, self._dbapi_error, dialect=self.engine.dialect
        )

    # -- writing --------------------------------------------------------------

    def write(self, intent: Checkpoint | Finish) -> bool:
        """Commit one checkpoint or final response.

        :returns: ``False`` when the run's lease is no longer ours (nothing
            was written).
        """
        if isinstance(intent, Finish):
            if intent.new_run is None and not (
                intent.inserts or intent.updates or intent.waits_possible
            ):
                return self._write_lone_finish(intent)
            with self._raw() as cur:
                return self._raw_finish(cur, intent, _now())
        if intent.new_run is None and len(intent.inserts) + len(intent.updates) == 1:
            # One fenced statement: written only while we hold the lease.
            if intent.inserts:
                rec = intent.inserts[0]
                return (
                    self._execute_single(
                        self._sql_insert_step_fenced,
                        (
                            rec.step_id,
                            rec.seq,
                            rec.status,
                            rec.attempts,
                            rec.output,
                            rec.error,
                            rec.due_at,
                            rec.started_at,
                            rec.finished_at,
                            rec.history,
                            intent.run_id,
                            intent.owner,
                        ),
                    )
                    == 1
                )
            params = (
                *self._step_update(intent.run_id, intent.updates[0]),
                intent.owner,
            )
            return self._execute_single(self._sql_update_step_fenced, params) == 1
        if intent.new_run is not None and len(intent.inserts) == 1:
            if self._insert_run_and_step(intent):
                return True
        with self._raw() as cur:
            return self._raw_checkpoint(cur, intent, _now())

    def _insert_run_and_step(self, c: Checkpoint) -> bool:
        """A new run with its first step in one statement, where the
        dialect can; ``False`` to take the general path."""
        return False

    def _write_lone_finish(self, f: Finish) -> bool:
        """A final response with nothing else to write."""
        return self._execute_single(self._sql_finish, self._finish_row(f, _now())) == 1

    def _raw_checkpoint(self, cur: Any, c: Checkpoint, now: float) -> bool:
        if c.new_run is not None:
            run = c.new_run
            cur.execute(
                self._sql_insert_run, self._run_row(run, now, due_at=run.created_at)
            )
        else:
            cur.execute(self._sql_fence, (now, c.run_id, c.owner))
            if cur.rowcount != 1:
                return False
        self._raw_steps(cur, c.run_id, c.inserts, c.updates)
        return True

    def _raw_finish(self, cur: Any, f: Finish, now: float) -> bool:
        if f.new_run is not None:
            cur.execute(
                self._sql_insert_run,
                self._run_row(
                    f.new_run,
                    now,
                    f.status,
                    leased=False,
                    response=f.response,
                    error=f.error,
                    finished_at=now,
                ),
            )
            if f.notify:
                self._raw_notify(cur, FINISHED_CHANNEL, f.run_id)
        else:
            cur.execute(self._finish_sql(f.notify), self._finish_row(f, now))
            if cur.rowcount != 1:
                return False
            if f.waits_possible:
                cur.execute(self._sql_delete_waits, (f.run_id,))
        self._raw_steps(cur, f.run_id, f.inserts, f.updates)
        return True

    def _finish_sql(self, notify: bool) -> str:
        """The finish statement inside a transaction."""
        return self._sql_finish

    def _raw_notify(self, cur: Any, channel: str, payload: str) -> None:
        """Queue a notification on a DB-API cursor (if supported)."""

    def _raw_steps(
        self,
        cur: Any,
        run_id: str,
        inserts: Sequence[StepRecord],
        updates: Sequence[StepRecord],
    ) -> None:
        for rec in inserts:
            cur.execute(self._sql_insert_step, self._step_row(run_id, rec))
        for rec in updates:
            cur.execute(self._sql_update_step, self._step_update(run_id, rec))

    def write_batch(self, intents: Sequence[Checkpoint | Finish]) -> set[str]:
        """Commit checkpoints and final responses of many runs in one
        transaction. Intents of a run whose lease is lost are skipped; their
        run ids are returned."""
        lost: set[str] = set()
        fenced: set[str] = set()
        now = _now()
        with self._raw() as cur:
            for intent in intents:
                run_id = intent.run_id
                if run_id in lost:
                    continue
                if isinstance(intent, Finish):
                    if not self._raw_finish(cur, intent, now):
                        lost.add(run_id)
                    continue
                run = intent.new_run
                if run is not None:
                    cur.execute(
                        self._sql_insert_run,
                        self._run_row(run, now, due_at=run.created_at),
                    )
                elif run_id not in fenced:
                    cur.execute(self._sql_fence, (now, run_id, intent.owner))
                    if cur.rowcount != 1:
                        lost.add(run_id)
                        continue
                fenced.add(run_id)
                self._raw_steps(cur, run_id, intent.inserts, intent.updates)
        return lost

    def suspend(self, s: Suspension) -> float | None:
        """Write a run's pending steps and waits and park it until
        ``s.due_at``.

        :returns: the due time stored (now instead of ``s.due_at`` when an
            event woke the run while it was executing), or ``None`` when
            the lease is no longer ours (nothing was written).
        """
        now = _now()
        try:
            with self._raw() as cur:
                due = self._raw_suspend(cur, s, now)
        except _Lost:
            return None
        return due

    def _raw_suspend(self, cur: Any, s: Suspension, now: float) -> float:
        due = s.due_at
        if s.new_run is not None:
            cur.execute(
                self._sql_insert_run,
                self._run_row(s.new_run, now, s.status, due, leased=False),
            )
        else:
            params = {"id": s.run_id, "owner": s.owner, "version": s.version}
            cur.execute(self._sql_park, dict(params, status=s.status, due=due, now=now))
            if cur.rowcount != 1:
                # Still ours but woken meanwhile: run again right away.
                due = now
                cur.execute(
                    self._sql_park_woken,
                    dict(params, status="scheduled", due=now, now=now),
                )
                if cur.rowcount != 1:
                    raise _Lost  # rolls the transaction back
        self._raw_steps(cur, s.run_id, s.inserts, s.updates)
        for wait in s.waits:
            cur.execute(self._sql_insert_wait, self._wait_params(s.run_id, wait))
        return due

    def _wait_params(self, run_id: str, wait: WaitSpec) -> dict[str, Any]:
        return {
            "run_id": run_id,
            "step_id": wait.step_id,
            "app_id": self.app_id,
            "event": wait.event,
            "match": wait.match,
            "since": wait.since,
            "expires_at": wait.expires_at,
        }

    def load_steps(self, run_id: str) -> list[StepRecord]:
        """The steps of a run, in the order they first ran."""
        with self._reading() as cur:
            cur.execute(self._sql_load_steps, {"run_id": run_id})
            return [StepRecord(*row) for row in cur.fetchall()]

    def _reading(self) -> AbstractContextManager[Any]:
        """A DB-API cursor for one read statement."""
        raise NotImplementedError

    # -- leases -----------------------------------------------------------------

    def claim(
        self,
        run_id: str,
        owner: str,
        endpoints: Sequence[str],
        *,
        force: bool = False,
    ) -> Claim | None:
        """Take the lease of one due run whose endpoint is in ``endpoints``.

        :param force: claim even if not due yet (cancellation).
        :returns: ``None`` when the run is not due, finished, leased by
            someone else, or not one of ``endpoints``.
        """
        if not endpoints:
            return None
        now = _now()
        params = self._endpoint_params(endpoints)
        params.update(
            id=run_id,
            owner=owner,
            expires=now + self.lease_seconds,
            now=now,
            due=float("inf") if force else now + 0.005,
        )
        with self._raw(single=True) as cur:
            cur.execute(self._claim_text(False, len(endpoints)), params)
            row = cur.fetchone()
        return None if row is None else self._claim(row, owner)

    def claim_due(
        self, owner: str, limit: int, endpoints: Sequence[str]
    ) -> list[Claim]:
        """Take the leases of up to ``limit`` due runs of ``endpoints`` whose
        lease is free or expired (crashed processes). Safe from many
        processes at once: each run is claimed by one of them."""
        if limit <= 0 or not endpoints:
            return []
        now = _now()
        params = self._endpoint_params(endpoints)
        params.update(
            owner=owner, expires=now + self.lease_seconds, now=now, limit=int(limit)
        )
        with self._raw(single=True) as cur:
            cur.execute(self._claim_text(True, len(endpoints)), params)
            return [self._claim(row, owner) for row in cur.fetchall()]

    def _endpoint_params(self, endpoints: Sequence[str]) -> dict[str, Any]:
        params: dict[str, Any] = {f"e{i}": e for i, e in enumerate(endpoints)}
        params["app_id"] = self.app_id
        return params

    @staticmethod
    def _claim(row: Sequence[Any], owner: str) -> Claim:
        run_id, version, attempt, deadline, cancel, endpoint, request = row
        return Claim(
            id=run_id,
            owner=owner,
            version=version,
            attempt=attempt,
            deadline=deadline,
            cancel_requested=bool(cancel),
            endpoint=endpoint,
            request=bytes(request),
            # A little after the lease began (the claim's round trip): well
            # inside the margin the execution keeps.
            claimed_at=time.monotonic(),
        )

    # -- streams ---------------------------------------------------------------

    def next_chunk_seq(self, run_id: str) -> int:
        """The ``seq`` the next stream event of a run takes."""
        with self.read() as conn:
            found = conn.execute(
                sa.select(sa.func.max(chunks.c.seq)).where(chunks.c.run_id == run_id)
            ).scalar()
        return int(found or 0) + 1

    def publish(self, run_id: str, seq: int, kind: str, data: str) -> None:
        """Store one stream event of a run (and tell other processes).

        Not synced to disk on its own (the step's result is, when it is
        checkpointed): an event costs a commit, not a flush."""
        with self.begin() as conn:
            self._relax_commit(conn)
            conn.execute(
                chunks.insert().values(
                    run_id=run_id,
                    seq=seq,
                    app_id=self.app_id,
                    kind=kind,
                    data=data,
                    ts=_now(),
                )
            )
            self._notify(conn, STREAM_CHANNEL, run_id)

    def _relax_commit(self, conn: Connection) -> None:
        """Let this transaction commit without waiting for the disk (SQLite
        in WAL mode with ``synchronous=NORMAL`` does already)."""

    def stream_events(self, run_id: str, after: int, limit: int = 500) -> list[Any]:
        """A run's stream events with ``seq > after``: ``seq, kind, data``."""
        with self.read() as conn:
            return list(
                conn.execute(
                    sa.select(chunks.c.seq, chunks.c.kind, chunks.c.data)
                    .where(
                        chunks.c.run_id == run_id,
                        chunks.c.app_id == self.app_id,
                        chunks.c.seq > after,
                    )
                    .order_by(chunks.c.seq)
                    .limit(limit)
                )
            )

    # -- flow control ------------------------------------------------------------

    def _lock_key(self, conn: Connection, key: str) -> None:
        """Serialize admissions of one flow key between processes, until
        the transaction ends (SQLite: the write transaction already does)."""

    def _gcra(
        self,
        conn: Connection,
        key: str,
        interval: float,
        burst: int,
        now: float,
        n: int,
    ) -> tuple[int, float]:
        """Take up to ``n`` starts of the limit ``key`` (one per
        ``interval`` seconds, ``burst`` at once), in the caller's
        transaction.

        :returns: how many were allowed, and in how many seconds the next
            one will be.
        """
        found = conn.execute(
            sa.select(flow.c.tat).where(flow.c.app_id == self.app_id, flow.c.key == key)
        ).scalar()
        tat = now if found is None else max(float(found), now)
        tolerance = (burst - 1) * interval
        allowed = 0
        while allowed < n and tat - now <= tolerance + 1e-9:
            tat += interval
            allowed += 1
        if allowed:
            if found is None:
                conn.execute(flow.insert().values(app_id=self.app_id, key=key, tat=tat))
            else:
                conn.execute(
                    flow.update()
                    .where(flow.c.app_id == self.app_id, flow.c.key == key)
                    .values(tat=tat)
                )
        return allowed, max(0.0, tat - tolerance - now)

    def rate_limit(self, key: str, interval: float, burst: int) -> float:
        """Take one start of a rate limit: ``0.0`` when allowed, else the
        seconds until one will be."""
        now = _now()
        with self.begin() as conn:
            self._lock_key(conn, key)
            allowed, wait = self._gcra(conn, key, interval, burst, now, 1)
        return 0.0 if allowed else max(wait, 0.001)

    def _running(self, conn: Connection, flow_key: str, now: float) -> int:
        """Runs of ``flow_key`` executing now (leased, lease not expired)."""
        return int(
            conn.execute(
                sa.select(sa.func.count())
                .select_from(runs)
                .where(
                    runs.c.app_id == self.app_id,
                    runs.c.flow_key == flow_key,
                    runs.c.due_at.isnot(None),
                    runs.c.status == "running",
                    runs.c.lease_expires_at >= now,
                )
            ).scalar_one()
        )

    def enter(
        self,
        run: NewRun,
        concurrency: int | None,
        throttle: tuple[float, int] | None,
    ) -> bool:
        """Store a new run under flow-control limits: running and leased by
        its owner when a slot is free (``True``), else queued, due now
        (``False``), in one transaction.

        :param throttle: ``(interval, burst)``, or ``None``.
        :raises IntegrityError: its idempotency key is taken.
        """
        assert run.flow_key is not None
        now = _now()
        with self.begin() as conn:
            self._lock_key(conn, run.flow_key)
            free = concurrency is None or self._running(conn, run.flow_key, now) < (
                concurrency
            )
            if free and throttle is not None:
                free = self._gcra(conn, run.flow_key, *throttle, now, 1)[0] == 1
            if free:
                row = self._run_row(run, now, due_at=run.created_at)
            else:
                row = self._run_row(run, now, "queued", now, leased=False)
            conn.execute(runs.insert(), dict(zip(_RUN_COLUMNS, row, strict=True)))
            if not free:
                self._notify(conn, WAKE_CHANNEL, run.id)
        return free

    def admit(
        self,
        owner: str,
        limits: dict[str, tuple[int | None, tuple[float, int] | None]],
        most: int,
    ) -> list[Claim]:
        """Claim due runs under flow-control limits while their limits allow,
        oldest first within each key: up to ``most``.

        :param limits: for each endpoint (or function) this process runs,
            its ``(concurrency, (interval, burst) or None)``.
        """
        if most <= 0 or not limits:
            return []
        now = _now()
        free_lease = sa.or_(
            runs.c.lease_expires_at.is_(None), runs.c.lease_expires_at < now
        )
        due = sa.and_(
            runs.c.app_id == self.app_id,
            runs.c.flow_key.isnot(None),
            runs.c.due_at.isnot(None),
            runs.c.due_at <= now,
            free_lease,
        )
        with self.read() as conn:
            keys = conn.execute(
                sa.select(runs.c.flow_key, runs.c.endpoint)
                .where(due, runs.c.endpoint.in_(list(limits)))
                .group_by(runs.c.flow_key, runs.c.endpoint)
                .limit(200)
            ).all()
        claims: list[Claim] = []
        for flow_key, endpoint in keys:
            if len(claims) >= most:
                break
            concurrency, throttle = limits[endpoint]
            with self.begin() as conn:
                self._lock_key(conn, flow_key)
                room = most - len(claims)
                if concurrency is not None:
                    room = min(room, concurrency - self._running(conn, flow_key, now))
                if room <= 0:
                    continue
                ids = list(
                    conn.execute(
                        sa.select(runs.c.id)
                        .where(due, runs.c.flow_key == flow_key)
                        .order_by(runs.c.due_at, runs.c.id)
                        .limit(room)
                    ).scalars()
                )
                if throttle is not None and ids:
                    allowed, _ = self._gcra(conn, flow_key, *throttle, now, len(ids))
                    ids = ids[:allowed]
                if not ids:
                    continue
                rows = conn.execute(
                    runs.update()
                    .where(runs.c.id.in_(ids), due)
                    .values(
                        lease_owner=owner,
                        lease_expires_at=now + self.lease_seconds,
                        status="running",
                        attempt=runs.c.attempt + 1,
                        version=runs.c.version + 1,
                        updated_at=now,
                    )
                    .returning(*(runs.c[c] for c in CLAIM_COLUMNS))
                ).all()
            claims += [self._claim(row, owner) for row in rows]
        return claims

    def flow_usage(self) -> list[Any]:
        """Each flow key with unfinished runs: ``flow_key, endpoint,
        running, queued`` (queued: due, not executing)."""
        now = _now()
        executing = sa.and_(runs.c.status == "running", runs.c.lease_expires_at >= now)
        with self.read() as conn:
            return list(
                conn.execute(
                    sa.select(
                        runs.c.flow_key,
                        runs.c.endpoint,
                        sa.func.sum(sa.case((executing, 1), else_=0)).label("running"),
                        sa.func.sum(
                            sa.case(
                                (sa.and_(sa.not_(executing), runs.c.due_at <= now), 1),
                                else_=0,
                            )
                        ).label("queued"),
                    )
                    .where(
                        runs.c.app_id == self.app_id,
                        runs.c.flow_key.isnot(None),
                        runs.c.due_at.isnot(None),
                    )
                    .group_by(runs.c.flow_key, runs.c.endpoint)
                    .order_by(runs.c.endpoint, runs.c.flow_key)
                    .limit(1000)
                )
            )

    def renew_one(self, run_id: str, owner: str) -> bool:
        """Extend one lease now. ``False`` when ``owner`` lost the run."""
        params = {"expires": _now() + self.lease_seconds, "id": run_id, "owner": owner}
        return self._execute_single(self._sql_renew, params) == 1

    def renew(self, leases: Iterable[tuple[str, str]]) -> tuple[set[str], set[str]]:
        """Extend the leases ``(run_id, owner)`` this process holds.

        :returns: ``(lost, cancelled)``: runs whose lease is gone, and runs
            whose cancellation was requested.
        """
        leases = list(leases)
        lost: set[str] = set()
        cancelled: set[str] = set()
        if not leases:
            return lost, cancelled
        now = _now()
        with self.begin() as conn:
            for run_id, owner in leases:
                done = conn.execute(
                    runs.update()
                    .where(runs.c.id == run_id, runs.c.lease_owner == owner)
                    .values(lease_expires_at=now + self.lease_seconds)
                ).rowcount
                if done != 1:
                    lost.add(run_id)
            ids = [r for r, _ in leases if r not in lost]
            if ids:
                cancelled = set(
                    conn.execute(
                        sa.select(runs.c.id).where(
                            runs.c.id.in_(ids), runs.c.cancel_requested.is_(True)
                        )
                    ).scalars()
                )
        return lost, cancelled

    def reschedule(self, run_id: str, owner: str, due_at: float) -> bool:
        """Give a claimed run back, ``scheduled`` for ``due_at`` (no
        handler here)."""
        with self.begin() as conn:
            return (
                conn.execute(
                    runs.update()
                    .where(runs.c.id == run_id, runs.c.lease_owner == owner)
                    .values(
                        status="scheduled",
                        due_at=due_at,
                        lease_owner=None,
                        lease_expires_at=None,
                        updated_at=_now(),
                    )
                ).rowcount
                == 1
            )

    def reschedule_now(self, run_id: str) -> None:
        """Make an unleased, unfinished run due now."""
        now = _now()
        with self.begin() as conn:
            conn.execute(
                runs.update()
                .where(
                    runs.c.id == run_id,
                    runs.c.app_id == self.app_id,
                    runs.c.due_at.isnot(None),
                    runs.c.lease_owner.is_(None),
                )
                .values(
                    status=sa.case(
                        (runs.c.status == "queued", "queued"), else_="scheduled"
                    ),
                    due_at=now,
                    updated_at=now,
                )
            )
            self._notify(conn, WAKE_CHANNEL, run_id)

    def release(self, run_id: str, owner: str) -> None:
        """Give a lease back without changing anything else."""
        with self.begin() as conn:
            conn.execute(
                runs.update()
                .where(runs.c.id == run_id, runs.c.lease_owner == owner)
                .values(lease_owner=None, lease_expires_at=None)
            )

    def upcoming(
        self, horizon: float, limit: int, endpoints: Sequence[str]
    ) -> list[tuple[str, float]]:
        """Runs of ``endpoints`` due within ``horizon`` seconds (for exact
        in-process timers)."""
        if not endpoints:
            return []
        now = _now()
        with self.read() as conn:
            rows = conn.execute(
                sa.select(runs.c.id, runs.c.due_at)
                .where(
                    runs.c.due_at > now,
                    runs.c.due_at <= now + horizon,
                    runs.c.app_id == self.app_id,
                    runs.c.endpoint.in_(list(endpoints)),
                )
                .order_by(runs.c.due_at)
                .limit(limit)
            )
            return [(r.id, r.due_at) for r in rows]

    # -- reading ------------------------------------------------------------------

    def get_run(self, run_id: str) -> Any:
        """The whole row of a run of this app, or ``None``."""
        with self.read() as conn:
            return conn.execute(
                sa.select(runs).where(runs.c.id == run_id, runs.c.app_id == self.app_id)
            ).first()

    def get_final(self, run_id: str) -> FinalState | None:
        """The status and final response of a run, or ``None`` if unknown."""
        with self.read() as conn:
            row = conn.execute(
                sa.select(runs.c.status, runs.c.response).where(
                    runs.c.id == run_id, runs.c.app_id == self.app_id
                )
            ).first()
        return None if row is None else FinalState(row.status, row.response)

    # -- cancellation -----------------------------------------------------------

    def request_cancel(self, run_id: str) -> bool:
        """Flag a run for cancellation and make it due now. ``False`` when
        the run is unknown or already finished."""
        now = _now()
        with self.begin() as conn:
            return (
                conn.execute(
                    runs.update()
                    .where(
                        runs.c.id == run_id,
                        runs.c.app_id == self.app_id,
                        runs.c.due_at.is_not(None),
                    )
                    .values(
                        cancel_requested=True,
                        due_at=self._least(runs.c.due_at, now),
                        version=runs.c.version + 1,
                        updated_at=now,
                    )
                ).rowcount
                == 1
            )

    # -- operating runs -----------------------------------------------------------

    def retry_failed(self, run_id: str) -> str | None:
        """Schedule a ``failed`` run of this app again, due now: its stored
        response and error are cleared, and its steps that failed for good
        get fresh attempts (``error`` status, ``attempts`` 0, their error
        and attempt history kept). Steps that completed stay memoized.

        :returns: ``None`` when the run is unknown, else its status before
            the call (only a ``"failed"`` run was changed).
        """
        now = _now()
        with self.begin() as conn:
            done = conn.execute(
                runs.update()
                .where(
                    runs.c.id == run_id,
                    runs.c.app_id == self.app_id,
                    runs.c.status == "failed",
                    runs.c.due_at.is_(None),
                )
                .values(
                    status="scheduled",
                    due_at=now,
                    response=None,
                    error=None,
                    finished_at=None,
                    cancel_requested=False,
                    lease_owner=None,
                    lease_expires_at=None,
                    version=runs.c.version + 1,
                    updated_at=now,
                )
            ).rowcount
            if done != 1:
                return conn.execute(
                    sa.select(runs.c.status).where(
                        runs.c.id == run_id, runs.c.app_id == self.app_id
                    )
                ).scalar()
            conn.execute(
                steps.update()
                .where(steps.c.run_id == run_id, steps.c.status == "failed")
                .values(status="error", attempts=0, due_at=None, finished_at=None)
            )
            self._notify(conn, WAKE_CHANNEL, run_id)
        return "failed"

    def rewind(self, run_id: str, step_id: str) -> str | None:
        """Delete step ``step_id`` of a run of this app and every step after
        it (by ``seq``), with their waits, and schedule the run due now (a
        terminal run's response and error are cleared), in one transaction.
        Nothing changes while the run's lease is held.

        :returns: ``None`` when the run is unknown; ``"no_step"`` when it
            has no step ``step_id``; ``"executing"`` when its lease is held;
            else ``"rewound"``.
        """
        now = _now()
        with self.begin() as conn:
            found = conn.execute(
                sa.select(runs.c.id).where(
                    runs.c.id == run_id, runs.c.app_id == self.app_id
                )
            ).first()
            if found is None:
                return None
            seq = conn.execute(
                sa.select(steps.c.seq).where(
                    steps.c.run_id == run_id, steps.c.step_id == step_id
                )
            ).scalar()
            if seq is None:
                return "no_step"
            done = conn.execute(
                runs.update()
                .where(
                    runs.c.id == run_id,
                    runs.c.app_id == self.app_id,
                    sa.or_(
                        runs.c.lease_expires_at.is_(None),
                        runs.c.lease_expires_at < now,
                    ),
                )
                .values(
                    status="scheduled",
                    due_at=now,
                    response=None,
                    error=None,
                    finished_at=None,
                    # A pending cancellation stays; a finished run's is over.
                    cancel_requested=sa.case(
                        (runs.c.due_at.is_(None), False),
                        else_=runs.c.cancel_requested,
                    ),
                    lease_owner=None,
                    lease_expires_at=None,
                    version=runs.c.version + 1,
                    updated_at=now,
                )
            ).rowcount
            if done != 1:
                return "executing"
            ids = list(
                conn.execute(
                    sa.select(steps.c.step_id).where(
                        steps.c.run_id == run_id, steps.c.seq >= seq
                    )
                ).scalars()
            )
            conn.execute(
                waits.delete().where(waits.c.run_id == run_id, waits.c.step_id.in_(ids))
            )
            conn.execute(
                steps.delete().where(steps.c.run_id == run_id, steps.c.seq >= seq)
            )
            self._notify(conn, WAKE_CHANNEL, run_id)
        return "rewound"

    def list_runs(
        self,
        *,
        status: str | None,
        endpoint: str | None,
        q: str | None,
        limit: int,
        before: str | None,
    ) -> list[Any]:
        """Up to ``limit`` runs of this app, newest first (by id, the
        primary key: no other index is needed), with ids below ``before``
        when given. ``q`` matches a run id or an idempotency key exactly
        (also a key scoped to a caller's credentials).

        :returns: rows of ``id, endpoint, status, attempt, created_at,
            updated_at, finished_at, due_at, error``.
        """
        query = sa.select(
            runs.c.id,
            runs.c.endpoint,
            runs.c.status,
            runs.c.attempt,
            runs.c.created_at,
            runs.c.updated_at,
            runs.c.finished_at,
            runs.c.due_at,
            runs.c.error,
        ).where(runs.c.app_id == self.app_id)
        if status is not None:
            query = query.where(runs.c.status == status)
        if endpoint is not None:
            query = query.where(runs.c.endpoint == endpoint)
        if before is not None:
            query = query.where(runs.c.id < before)
        query = query.order_by(runs.c.id.desc()).limit(limit)
        if q is None:
            with self.read() as conn:
                return list(conn.execute(query))
        # Two queries rather than one OR: the id is found by the primary key,
        # the key by the partial index over the runs that hold one (the
        # scoped form "<caller>\x1f<key>" is matched on that index alone).
        by_id = query.where(runs.c.id == q)
        by_key = query.where(
            runs.c.idempotency_key.isnot(None),
            sa.or_(
                runs.c.idempotency_key == q,
                runs.c.idempotency_key.endswith("\x1f" + q, autoescape=True),
            ),
        )
        with self.read() as conn:
            found = {r.id: r for r in conn.execute(by_id)}
            found.update((r.id, r) for r in conn.execute(by_key))
        return sorted(found.values(), key=lambda r: r.id, reverse=True)[:limit]

    def backlog(self) -> Backlog:
        """The unfinished runs of this app by status, and those due now
        that no process holds. Reads unfinished runs only (through the
        partial index on ``due_at``), however many finished runs the table
        keeps."""
        now = _now()
        free = sa.or_(runs.c.lease_expires_at.is_(None), runs.c.lease_expires_at < now)
        due = sa.and_(runs.c.due_at <= now, free)
        query = (
            sa.select(
                runs.c.status,
                sa.func.count(),
                sa.func.count(sa.case((due, 1))),
                sa.func.min(sa.case((due, runs.c.due_at))),
            )
            .where(runs.c.due_at.is_not(None), runs.c.app_id == self.app_id)
            .group_by(runs.c.status)
        )
        with self.read() as conn:
            rows = conn.execute(query).all()
        oldest = [row[3] for row in rows if row[3] is not None]
        return Backlog(
            by_status={row[0]: int(row[1]) for row in rows},
            due=sum(int(row[2]) for row in rows),
            oldest_due_at=min(oldest) if oldest else None,
        )

    def insert_scheduled(
        self,
        new_runs: Sequence[NewRun],
        new_waits: Sequence[tuple[str, WaitSpec]] = (),
        ahead: Mapping[str, float] | None = None,
    ) -> list[str]:
        """Insert runs due now, unleased (function runs), with waits
        ``(run_id, wait)`` of theirs, in one transaction; a run whose id
        exists already is left as it is (and gets no waits). A run with a
        flow key is ``queued``; ``ahead`` moves runs that many seconds ahead
        in their queue (priority).

        :returns: the ids of the runs this call inserted (one that another
            process inserted at the same instant may be listed too: the
            list is for waking schedulers, never for counting).
        """
        if not new_runs:
            return []
        now = _now()
        rows = [
            dict(
                zip(
                    _RUN_COLUMNS,
                    self._run_row(
                        run,
                        now,
                        "queued" if run.flow_key is not None else "scheduled",
                        # A microsecond apart: first in, first out.
                        now + i * 1e-6 - (ahead or {}).get(run.id, 0.0),
                        leased=False,
                    ),
                    strict=True,
                )
            )
            for i, run in enumerate(new_runs)
        ]
        ids = [run.id for run in new_runs]
        with self.begin() as conn:
            existing = set(
                conn.execute(sa.select(runs.c.id).where(runs.c.id.in_(ids))).scalars()
            )
            fresh = [row for row in rows if row["id"] not in existing]
            if fresh:
                insert = (
                    sqlite_insert(runs)
                    if self.engine.dialect.name == "sqlite"
                    else postgresql_insert(runs)
                )
                conn.execute(insert.on_conflict_do_nothing(), fresh)
                ids_fresh = {row["id"] for row in fresh}
                wait_rows = [
                    self._wait_params(run_id, wait)
                    for run_id, wait in new_waits
                    if run_id in ids_fresh
                ]
                if wait_rows:
                    conn.execute(waits.insert(), wait_rows)
                self._notify_many(conn, WAKE_CHANNEL, [row["id"] for row in fresh])
        return [row["id"] for row in fresh]

    def debounce(
        self, run: NewRun, period: float, timeout: float | None
    ) -> tuple[str, bool]:
        """Store a debounced function run: the pending run holding the
        debounce key ``run.idempotency_key`` (not started yet) takes this
        run's request (the latest event) and is due ``period`` seconds from
        now, but no later than ``timeout`` after it was first stored; or,
        when none is pending, ``run`` is stored so.

        :returns: the pending run's id, and whether it is new.
        """
        key = run.idempotency_key
        assert key is not None
        now = _now()
        due = now + period
        mine = sa.and_(
            runs.c.app_id == self.app_id,
            runs.c.endpoint == run.endpoint,
            runs.c.idempotency_key == key,
        )
        with self.begin() as conn:
            self._lock_key(conn, key)
            row = conn.execute(
                sa.select(
                    runs.c.id, runs.c.created_at, runs.c.attempt, runs.c.lease_owner
                ).where(mine)
            ).first()
            if row is not None and row.attempt == 0 and row.lease_owner is None:
                if timeout is not None:
                    due = min(due, row.created_at + timeout)
                conn.execute(
                    runs.update()
                    .where(runs.c.id == row.id)
                    .values(request=run.request, due_at=due, updated_at=now)
                )
                return str(row.id), False
            if row is not None:  # started: the next pending run takes the key
                conn.execute(runs.update().where(mine).values(idempotency_key=None))
            values = dict(
                zip(
                    _RUN_COLUMNS,
                    self._run_row(run, now, "scheduled", due, leased=False),
                    strict=True,
                )
            )
            conn.execute(runs.insert(), values)
        return run.id, True

    def batch(
        self,
        run: NewRun,
        add: Callable[[bytes], tuple[bytes, int]],
        max_size: int,
        timeout: float,
    ) -> tuple[str, bool]:
        """Add an event to the pending batch run holding the key
        ``run.idempotency_key``, or store ``run`` (holding the event) as
        that run. ``add`` turns the pending run's request into one holding
        the event too, and says how many it holds. A full batch is due now
        (and lets the key go to the next batch), else ``timeout`` after its
        first event.

        :returns: the batch run's id, and whether it is new.
        """
        key = run.idempotency_key
        assert key is not None
        now = _now()
        mine = sa.and_(
            runs.c.app_id == self.app_id,
            runs.c.endpoint == run.endpoint,
            runs.c.idempotency_key == key,
        )
        with self.begin() as conn:
            self._lock_key(conn, key)
            row = conn.execute(
                sa.select(
                    runs.c.id,
                    runs.c.request,
                    runs.c.created_at,
                    runs.c.attempt,
                    runs.c.lease_owner,
                ).where(mine)
            ).first()
            if row is not None and row.attempt == 0 and row.lease_owner is None:
                blob, size = add(bytes(row.request))
                full = size >= max_size
                conn.execute(
                    runs.update()
                    .where(runs.c.id == row.id)
                    .values(
                        request=blob,
                        due_at=now if full else row.created_at + timeout,
                        updated_at=now,
                        idempotency_key=None if full else key,
                    )
                )
                if full:
                    self._notify(conn, WAKE_CHANNEL, row.id)
                return str(row.id), False
            if row is not None:  # started: the next batch takes the key
                conn.execute(runs.update().where(mine).values(idempotency_key=None))
            full = max_size <= 1
            values = dict(
                zip(
                    _RUN_COLUMNS,
                    self._run_row(
                        run,
                        now,
                        "scheduled",
                        now if full else now + timeout,
                        leased=False,
                    ),
                    strict=True,
                )
            )
            if full:
                values["idempotency_key"] = None
            conn.execute(runs.insert(), values)
        return run.id, True

    # -- idempotency ------------------------------------------------------------

    def try_insert_idempotent_run(self, run: NewRun) -> bool:
        """Insert a run that carries an idempotency key, leased to its
        owner. ``False`` when a live run already holds the key (an expired
        one is released first)."""
        for _ in range(2):
            try:
                with self.begin() as conn:
                    conn.execute(runs.insert(), self._run_params(run, _now()))
                return True
            except IntegrityError:
                with self.begin() as conn:
                    released = conn.execute(
                        runs.update()
                        .where(
                            runs.c.app_id == self.app_id,
                            runs.c.endpoint == run.endpoint,
                            runs.c.idempotency_key == run.idempotency_key,
                            runs.c.idempotency_expires_at < run.created_at,
                        )
                        .values(idempotency_key=None)
                    ).rowcount
                if not released:
                    return False
        return False

    def find_idempotent(self, endpoint: str, key: str) -> Any:
        """``id, status, request_hash, idempotency_expires_at, response`` of
        the run holding ``key`` on ``endpoint``, or ``None``."""
        with self.read() as conn:
            return conn.execute(
                sa.select(
                    runs.c.id,
                    runs.c.status,
                    runs.c.request_hash,
                    runs.c.idempotency_expires_at,
                    runs.c.response,
                ).where(
                    runs.c.app_id == self.app_id,
                    runs.c.endpoint == endpoint,
                    runs.c.idempotency_key == key,
                )
            ).first()

    # -- events -------------------------------------------------------------------

    def insert_event(
        self, event_id: str, name: str, data: str, ts: float, dedupe_window: float
    ) -> bool:
        """Store an event. ``False`` when an event with this id was stored
        within ``dedupe_window`` seconds (a duplicate)."""
        return self.insert_events([(event_id, name, data, ts)], dedupe_window)[0]

    def insert_events(
        self, rows: Sequence[tuple[str, str, str, float]], dedupe_window: float
    ) -> list[bool]:
        """Store events ``(id, name, data, ts)`` in one transaction: all of
        them or none. For each, ``False`` when an event with its id was
        stored within ``dedupe_window`` seconds before it (a duplicate, also
        within ``rows``); an older one is replaced."""
        ids = list({row[0] for row in rows})
        attempts = 0
        while True:
            try:
                with self.begin() as conn:
                    found: dict[str, float] = dict(
                        conn.execute(
                            sa.select(events.c.id, events.c.ts).where(
                                events.c.app_id == self.app_id, events.c.id.in_(ids)
                            )
                        ).all()
                    )
                    stored: list[bool] = []
                    new: list[dict[str, Any]] = []
                    for event_id, name, data, ts in rows:
                        old = found.get(event_id)
                        fresh = old is None or old < ts - dedupe_window
                        stored.append(fresh)
                        if not fresh:
                            continue
                        if old is None:
                            new.append(
                                {
                                    "app_id": self.app_id,
                                    "id": event_id,
                                    "name": name,
                                    "data": data,
                                    "ts": ts,
                                }
                            )
                        else:
                            conn.execute(
                                events.update()
                                .where(
                                    events.c.app_id == self.app_id,
                                    events.c.id == event_id,
                                )
                                .values(name=name, data=data, ts=ts)
                            )
                        found[event_id] = ts
                    if new:
                        conn.execute(events.insert(), new)
                return stored
            except IntegrityError:
                # Another process stored one of these ids meanwhile.
                attempts += 1
                if attempts == 3:
                    raise

    def waits_for_many(self, names: Sequence[str], lo: float, hi: float) -> list[Any]:
        """Waits on any of the events ``names`` that may take an event sent
        between ``lo`` and ``hi`` (one query for a batch of events; filter
        each event's by its own time): ``run_id, step_id, match, event,
        since, expires_at`` rows."""
        with self.read() as conn:
            return list(
                conn.execute(
                    sa.select(
                        waits.c.run_id,
                        waits.c.step_id,
                        waits.c.match,
                        waits.c.event,
                        waits.c.since,
                        waits.c.expires_at,
                    ).where(
                        waits.c.app_id == self.app_id,
                        waits.c.event.in_(list(names)),
                        waits.c.since <= hi,
                        waits.c.expires_at > lo,
                    )
                )
            )

    def waits_for(self, name: str, ts: float) -> list[Any]:
        """Waits on event ``name`` that began no later than ``ts``:
        ``run_id, step_id, match`` rows."""
        with self.read() as conn:
            return list(
                conn.execute(
                    sa.select(waits.c.run_id, waits.c.step_id, waits.c.match).where(
                        waits.c.app_id == self.app_id,
                        waits.c.event == name,
                        waits.c.since <= ts,
                        waits.c.expires_at > ts,
                    )
                )
            )

    def events_since(self, name: str, since: float, until: float) -> list[Any]:
        """Events named ``name`` stored in ``[since, until)``, oldest first."""
        with self.read() as conn:
            return list(
                conn.execute(
                    sa.select(events.c.id, events.c.name, events.c.data, events.c.ts)
                    .where(
                        events.c.app_id == self.app_id,
                        events.c.name == name,
                        events.c.ts >= since,
                        events.c.ts < until,
                    )
                    .order_by(events.c.ts)
                )
            )

    def deliver(self, run_id: str, step_id: str, output: str) -> bool:
        """Complete a waiting step with an event and make its run due now.
        ``False`` if the step was no longer waiting."""
        now = _now()
        with self.begin() as conn:
            done = conn.execute(
                steps.update()
                .where(
                    steps.c.run_id == run_id,
                    steps.c.step_id == step_id,
                    steps.c.status == "waiting",
                )
                .values(status="completed", output=output, finished_at=now, due_at=None)
            ).rowcount
            if done != 1:
                return False
            conn.execute(
                waits.delete().where(
                    waits.c.run_id == run_id, waits.c.step_id == step_id
                )
            )
            conn.execute(
                runs.update()
                .where(runs.c.id == run_id, runs.c.due_at.is_not(None))
                .values(
                    due_at=now,
                    version=runs.c.version + 1,
                    updated_at=now,
                    status=sa.case(
                        (runs.c.status == "running", "running"), else_="scheduled"
                    ),
                )
            )
            self._notify(conn, WAKE_CHANNEL, run_id)
        return True

    def purge_events(self, older_than: float) -> int:
        """Forget events stored before ``older_than``."""
        with self.begin() as conn:
            return conn.execute(
                events.delete().where(
                    events.c.app_id == self.app_id, events.c.ts < older_than
                )
            ).rowcount

    def prune(self, before: float, limit: int) -> int:
        """Delete up to ``limit`` terminal runs of this app finished before
        ``before``, with their steps and waits, in one transaction; returns
        how many runs were deleted.

        No index serves this: run ids begin with their creation time in ms
        (a run finished before ``before`` was created before it), so the
        primary key range ``id < hex(before)`` bounds the scan.
        """
        bound = f"{max(int(before * 1000), 0):012x}"
        with self.begin() as conn:
            ids = list(
                conn.execute(
                    sa.select(runs.c.id)
                    .where(
                        runs.c.id < bound,
                        runs.c.app_id == self.app_id,
                        runs.c.due_at.is_(None),
                        runs.c.finished_at < before,
                    )
                    .order_by(runs.c.id)
                    .limit(limit)
                    # Two processes pruning at once take different runs.
                    .with_for_update(skip_locked=True)
                ).scalars()
            )
            if not ids:
                return 0
            conn.execute(steps.delete().where(steps.c.run_id.in_(ids)))
            conn.execute(waits.delete().where(waits.c.run_id.in_(ids)))
            conn.execute(chunks.delete().where(chunks.c.run_id.in_(ids)))
            return int(conn.execute(runs.delete().where(runs.c.id.in_(ids))).rowcount)

    # -- connections and schema -----------------------------------------------

    @contextmanager
    def begin(self) -> Iterator[Connection]:
        """A short write transaction (SQLAlchemy Core)."""
        with self._writer_lock(), self.engine.begin() as conn:
            yield conn

    @contextmanager
    def read(self) -> Iterator[Connection]:
        """A read-only connection (no write lock on SQLite)."""
        with self._read.connect() as conn:
            yield conn

    def dispose(self, close: bool = True) -> None:
        """Drop pooled connections (``close=False`` after ``fork()``)."""
        self.engine.dispose(close=close)

    def create_all(self) -> None:
        """Create the tables if needed, migrate older ones, and check the
        schema version."""
        for attempt in range(3):
            try:
                metadata.create_all(self.engine, checkfirst=True)
                break
            except sa.exc.DatabaseError:
                # Another process created them at the same moment.
                if attempt == 2:
                    raise
                time.sleep(0.2)
        with self.begin() as conn:
            self._lock_meta(conn)
            found = conn.execute(
                sa.select(meta.c.value).where(meta.c.key == "schema_version")
            ).scalar()
            if found is None:
                self._insert_meta(conn, "schema_version", str(SCHEMA_VERSION))
            elif int(found) > SCHEMA_VERSION:
                raise RuntimeError(
                    f"the durable tables have schema version {found}, newer than"
                    f" this flask-durable ({SCHEMA_VERSION}): upgrade the package"
                )
            elif int(found) < SCHEMA_VERSION:
                migrate(conn, int(found), self.app_id)
                conn.execute(
                    meta.update()
                    .where(meta.c.key == "schema_version")
                    .values(value=str(SCHEMA_VERSION))
                )

    def _lock_meta(self, conn: Connection) -> None:
        """Serialize schema checks between processes (SQLite: the write
        transaction already does)."""

    def _insert_meta(self, conn: Connection, key: str, value: str) -> None:
        try:
            with conn.begin_nested():
                conn.execute(meta.insert().values(key=key, value=value))
        except IntegrityError:
            pass

    def meta_value(self, key: str, default: str) -> str:
        """The value stored under ``key`` (64 characters at most), storing
        ``default`` first when there is none: every process reads the value
        of the first one to ask."""
        with self.begin() as conn:
            found = conn.execute(sa.select(meta.c.value).where(meta.c.key == key))
            value = found.scalar()
            if value is None:
                self._insert_meta(conn, key, default)
                value = conn.execute(
                    sa.select(meta.c.value).where(meta.c.key == key)
                ).scalar_one()
            return str(value)

    def secret(self) -> str:
        """A random secret shared by every process using this database, for
        signing wait tokens when the app has no ``SECRET_KEY``."""
        with self.begin() as conn:
            found = conn.execute(
                sa.select(meta.c.value).where(meta.c.key == "secret")
            ).scalar()
            if found is None:
                self._insert_meta(conn, "secret", secrets.token_urlsafe(32))
                found = conn.execute(
                    sa.select(meta.c.value).where(meta.c.key == "secret")
                ).scalar_one()
            return str(found)
