"""SQLAlchemy Core tables and every query flask-durable makes.

This is the only module that speaks SQL. Times are stored as POSIX
timestamps (floats) so that comparisons are cheap and portable.

Run rows carry ``due_at``: the time the run should next be executed. It is
set while a run is not terminal (for a running run it is the time it
started, so that a run whose process died is found by the same query once its
lease expires) and ``NULL`` once it is terminal. One index on ``due_at``
therefore serves the sweeper, however many finished runs the table holds.
"""

from __future__ import annotations

import os
import re
import secrets
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from typing import Any, NamedTuple

import sqlalchemy as sa
from sqlalchemy import event as sa_event
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import IntegrityError

#: Bump when the tables change; see ``docs/upgrading``.
SCHEMA_VERSION = 1

#: Statuses of a finished run; its final response is stored.
TERMINAL_STATUSES = ("completed", "failed", "cancelled")

metadata = sa.MetaData()

meta = sa.Table(
    "durable_meta",
    metadata,
    sa.Column("key", sa.String(64), primary_key=True),
    sa.Column("value", sa.Text, nullable=False),
)

runs = sa.Table(
    "durable_runs",
    metadata,
    sa.Column("id", sa.String(32), primary_key=True),
    sa.Column("endpoint", sa.String(255), nullable=False),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("attempt", sa.Integer, nullable=False, default=0),
    sa.Column("version", sa.Integer, nullable=False, default=0),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("updated_at", sa.Float, nullable=False),
    sa.Column("finished_at", sa.Float),
    sa.Column("due_at", sa.Float),
    sa.Column("deadline", sa.Float),
    sa.Column("lease_owner", sa.String(64)),
    sa.Column("lease_expires_at", sa.Float),
    sa.Column("cancel_requested", sa.Boolean, nullable=False, default=False),
    sa.Column("idempotency_key", sa.String(255)),
    sa.Column("request_hash", sa.String(64)),
    sa.Column("idempotency_expires_at", sa.Float),
    sa.Column("request", sa.LargeBinary, nullable=False),
    sa.Column("response", sa.LargeBinary),
    sa.Column("error", sa.Text),
    # Partial indexes: finished runs and runs without a key cost nothing.
    sa.Index(
        "ix_durable_runs_due",
        "due_at",
        sqlite_where=sa.text("due_at IS NOT NULL"),
        postgresql_where=sa.text("due_at IS NOT NULL"),
    ),
    sa.Index("ix_durable_runs_created", "created_at", "id"),
    sa.Index(
        "ux_durable_runs_idempotency",
        "endpoint",
        "idempotency_key",
        unique=True,
        sqlite_where=sa.text("idempotency_key IS NOT NULL"),
        postgresql_where=sa.text("idempotency_key IS NOT NULL"),
    ),
)

steps = sa.Table(
    "durable_steps",
    metadata,
    sa.Column("run_id", sa.String(32), primary_key=True),
    sa.Column("step_id", sa.String(255), primary_key=True),
    sa.Column("seq", sa.Integer, nullable=False, default=0),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("attempts", sa.Integer, nullable=False, default=0),
    sa.Column("output", sa.Text),
    sa.Column("error", sa.Text),
    sa.Column("due_at", sa.Float),
    sa.Column("started_at", sa.Float, nullable=False),
    sa.Column("finished_at", sa.Float),
    sqlite_with_rowid=False,
)

waits = sa.Table(
    "durable_waits",
    metadata,
    sa.Column("run_id", sa.String(32), primary_key=True),
    sa.Column("step_id", sa.String(255), primary_key=True),
    sa.Column("event", sa.String(255), nullable=False),
    sa.Column("match", sa.Text, nullable=False),
    sa.Column("since", sa.Float, nullable=False),
    sa.Column("expires_at", sa.Float, nullable=False),
    sa.Index("ix_durable_waits_event", "event"),
)

events = sa.Table(
    "durable_events",
    metadata,
    sa.Column("id", sa.String(128), primary_key=True),
    sa.Column("name", sa.String(255), nullable=False),
    sa.Column("data", sa.Text, nullable=False),
    sa.Column("ts", sa.Float, nullable=False),
    sa.Index("ix_durable_events_name_ts", "name", "ts"),
    sa.Index("ix_durable_events_ts", "ts"),
)

_STEP_COLUMNS = (
    steps.c.step_id,
    steps.c.seq,
    steps.c.status,
    steps.c.attempts,
    steps.c.output,
    steps.c.error,
    steps.c.due_at,
    steps.c.started_at,
    steps.c.finished_at,
)


#: What a store call raises when the database cannot be used right now
#: (unreachable, locked, out of connections): answered with ``503``.
UNAVAILABLE: tuple[type[Exception], ...] = (sa.exc.DBAPIError, sa.exc.TimeoutError)


class LeaseLost(Exception):
    """A write was refused because this process no longer owns the run."""


def _now() -> float:
    return time.time()


class Store:
    """Every database access of one :class:`~flask_durable.Durable` app.

    :param url: a SQLAlchemy URL.
    :param engine_options: extra keyword arguments for
        :func:`sqlalchemy.create_engine`.
    :param sqlite_busy_timeout: seconds a SQLite writer waits for the lock.
    :param sqlite_synchronous: ``PRAGMA synchronous`` for SQLite
        (``"NORMAL"`` or ``"FULL"``).
    """

    def __init__(
        self,
        url: str,
        engine_options: dict[str, Any] | None = None,
        sqlite_synchronous: str = "NORMAL",
        sqlite_busy_timeout: float = 30.0,
        lease_seconds: float = 15.0,
    ) -> None:
        options = dict(engine_options or {})
        #: Seconds a lease lasts; a new run's lease starts when its row is
        #: written, not when its request began.
        self.lease_seconds = lease_seconds
        sa_url = sa.engine.make_url(url)
        self.dialect = sa_url.get_backend_name()
        self.is_sqlite = self.dialect == "sqlite"
        self.is_postgres = self.dialect == "postgresql"
        if self.is_sqlite:
            database = sa_url.database or ""
            if database in ("", ":memory:") or database.startswith("file::memory"):
                raise ValueError(
                    "flask-durable needs a SQLite file (an in-memory database is"
                    " not shared between the threads that resume runs)"
                )
            directory = os.path.dirname(os.path.abspath(database))
            os.makedirs(directory, exist_ok=True)
            options.setdefault("pool_size", 20)
            options.setdefault("max_overflow", 20)
        else:
            options.setdefault("pool_size", 10)
            options.setdefault("max_overflow", 20)
        self.engine: Engine = sa.create_engine(sa_url, **options)
        #: SQLite's ``PRAGMA synchronous`` (``None`` for other databases).
        self.synchronous: str | None = None
        if self.is_sqlite:
            sync = sqlite_synchronous.upper()
            if sync not in ("OFF", "NORMAL", "FULL", "EXTRA"):
                raise ValueError(
                    f"bad DURABLE_SQLITE_SYNCHRONOUS: {sqlite_synchronous!r}"
                )
            self._setup_sqlite(sync, int(sqlite_busy_timeout * 1000))
            self.synchronous = sync
        self._read = self.engine.execution_options(durable_readonly=True)
        # SQLite has one writer at a time and its busy handler polls with
        # sleeps, which starves threads under load (a heartbeat could wait
        # past its lease). Threads of this process queue on a lock instead;
        # other processes still meet the busy timeout.
        self._writer: Any = threading.RLock() if self.is_sqlite else nullcontext()
        self._sqlite_writer: Any = None
        self._prepare_hot_sql()

    # -- connections --------------------------------------------------------

    def _setup_sqlite(self, synchronous: str, busy_ms: int) -> None:
        @sa_event.listens_for(self.engine, "connect")
        def _on_connect(dbapi_conn: Any, record: Any) -> None:
            # Take transaction control away from the sqlite3 module so that
            # writers can start with BEGIN IMMEDIATE (no lock upgrades, so no
            # SQLITE_BUSY deadlocks between processes).
            dbapi_conn.isolation_level = None
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute(f"PRAGMA synchronous={synchronous}")
            cur.execute(f"PRAGMA busy_timeout={busy_ms}")
            cur.close()

        @sa_event.listens_for(self.engine, "begin")
        def _on_begin(conn: Connection) -> None:
            if conn.get_execution_options().get("durable_readonly"):
                conn.exec_driver_sql("BEGIN")
            else:
                conn.exec_driver_sql("BEGIN IMMEDIATE")

    # -- the hot path: plain DB-API, SQL built once ---------------------------

    def _prepare_hot_sql(self) -> None:
        """Checkpoints and final responses are written on every request;
        they skip SQLAlchemy's statement machinery (about 4x cheaper)."""

        def sql(text: str) -> str:
            if self.is_sqlite:  # sqlite3 takes :name parameters natively
                return text
            return re.sub(r":(\w+)", r"%(\1)s", text)

        run_cols = [c.name for c in runs.columns]
        step_cols = [c.name for c in steps.columns]
        self._run_cols = run_cols
        self._sql_insert_run = sql(
            f"INSERT INTO durable_runs ({', '.join(run_cols)})"
            f" VALUES ({', '.join(':' + c for c in run_cols)})"
        )
        self._sql_insert_step = sql(
            f"INSERT INTO durable_steps ({', '.join(step_cols)})"
            f" VALUES ({', '.join(':' + c for c in step_cols)})"
        )
        # PostgreSQL: a new run and its first step in one statement, so one
        # round trip instead of four (BEGIN, two INSERTs, COMMIT).
        self._sql_insert_run_and_step = sql(
            f"WITH new_run AS (INSERT INTO durable_runs ({', '.join(run_cols)})"
            f" VALUES ({', '.join(':r_' + c for c in run_cols)}))"
            f" INSERT INTO durable_steps ({', '.join(step_cols)})"
            f" VALUES ({', '.join(':' + c for c in step_cols)})"
        )
        settable = [c for c in step_cols if c not in ("run_id", "step_id")]
        self._sql_update_step = sql(
            f"UPDATE durable_steps SET {', '.join(f'{c} = :{c}' for c in settable)}"
            " WHERE run_id = :run_id AND step_id = :step_id"
        )
        owned = (
            " EXISTS (SELECT 1 FROM durable_runs"
            " WHERE id = :run_id AND lease_owner = :owner)"
        )
        if self.is_sqlite:
            values = ", ".join(":" + c for c in step_cols)
        else:  # bare parameters in a SELECT list would be typed as text
            dialect = self.engine.dialect
            values = ", ".join(
                f"CAST(:{c.name} AS {c.type.compile(dialect=dialect)})"
                for c in steps.columns
            )
        self._sql_insert_step_fenced = sql(
            f"INSERT INTO durable_steps ({', '.join(step_cols)})"
            f" SELECT {values} WHERE{owned}"
        )
        self._sql_update_step_fenced = sql(
            f"UPDATE durable_steps SET {', '.join(f'{c} = :{c}' for c in settable)}"
            f" WHERE run_id = :run_id AND step_id = :step_id AND{owned}"
        )
        self._sql_renew = sql(
            "UPDATE durable_runs SET lease_expires_at = :expires"
            " WHERE id = :id AND lease_owner = :owner"
        )
        self._sql_fence = sql(
            "UPDATE durable_runs SET updated_at = :now"
            " WHERE id = :id AND lease_owner = :owner"
        )
        finish = (
            "UPDATE durable_runs SET status = :status, response = :response,"
            " error = :error, finished_at = :now, updated_at = :now, due_at = NULL,"
            " lease_owner = NULL, lease_expires_at = NULL{source}"
            " WHERE id = :id AND lease_owner = :owner"
        )
        self._sql_finish = sql(finish.format(source=""))
        # PostgreSQL: finish and notify in one statement (one round trip).
        self._sql_finish_notify = sql(
            "WITH done AS ("
            + self._sql_finish
            + " RETURNING id) SELECT pg_notify(:channel, id) FROM done"
        )
        # PostgreSQL, a finish on its own: committed without waiting for the
        # WAL flush (synchronous_commit=off for this transaction only). Its
        # steps are committed already; if the server loses this commit in a
        # crash, the run is still leased and is replayed, each step
        # memoized, to store its response again.
        quick = "quick AS (SELECT set_config('synchronous_commit', 'off', true))"
        finish_quick = finish.format(source=" FROM quick")
        self._sql_finish_quick = sql(f"WITH {quick} {finish_quick}")
        self._sql_finish_notify_quick = sql(
            f"WITH {quick}, done AS ({finish_quick} RETURNING durable_runs.id)"
            " SELECT pg_notify(:channel, id) FROM done"
        )
        self._sql_claim = sql(
            "UPDATE durable_runs SET lease_owner = :owner, lease_expires_at = :expires,"
            " status = 'running', attempt = attempt + 1, version = version + 1,"
            " updated_at = :now"
            " WHERE id = :id AND due_at IS NOT NULL AND due_at <= :due"
            " AND (lease_expires_at IS NULL OR lease_expires_at < :now)"
            f" RETURNING {', '.join(c.name for c in _CLAIM_COLUMNS)}"
        )
        free = "(lease_expires_at IS NULL OR lease_expires_at < :now)"
        self._sql_claim_due = sql(
            "UPDATE durable_runs SET lease_owner = :owner, lease_expires_at = :expires,"
            " status = 'running', attempt = attempt + 1, version = version + 1,"
            " updated_at = :now"
            " WHERE id IN (SELECT id FROM durable_runs"
            f" WHERE due_at <= :now AND {free} ORDER BY due_at LIMIT :limit"
            + (" FOR UPDATE SKIP LOCKED" if self.is_postgres else "")
            + f") AND due_at <= :now AND {free}"
            f" RETURNING {', '.join(c.name for c in _CLAIM_COLUMNS)}"
        )
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
        self._step_names = [c.name for c in _STEP_COLUMNS]
        self._sql_load_steps = sql(
            f"SELECT {', '.join(self._step_names)} FROM durable_steps"
            " WHERE run_id = :run_id ORDER BY seq"
        )
        self._sql_delete_waits = sql("DELETE FROM durable_waits WHERE run_id = :id")
        self._sql_notify = sql("SELECT pg_notify(:channel, :payload)")
        self._dbapi_error = self.engine.dialect.loaded_dbapi.Error

    @contextmanager
    def _raw(self, single: bool = False) -> Iterator[Any]:
        """A write transaction on a pooled DB-API connection. Driver errors
        come out as :class:`sqlalchemy.exc.DBAPIError`, like Core's.

        :param single: the transaction is one statement; SQLite runs it in
            autocommit mode, which is atomic on its own.
        """
        with self._writer:
            yield from self._raw_unlocked(single)

    def _raw_unlocked(self, single: bool) -> Iterator[Any]:
        conn: Any = self._sqlite_conn() if self.is_sqlite else self._connect()
        cur = None
        autocommit = single and self.is_postgres
        try:
            if autocommit:
                conn.driver_connection.autocommit = True
            cur = conn.cursor()
            if self.is_sqlite and not single:
                cur.execute("BEGIN IMMEDIATE")
            yield cur
            if not single:
                conn.commit()
        except self._dbapi_error as e:
            failed, cur = cur, None
            raise self._failed(conn, failed, e) from e
        except BaseException:
            conn.rollback()
            raise
        finally:
            if cur is not None:
                cur.close()
            if autocommit and conn.driver_connection is not None:
                conn.driver_connection.autocommit = False
            if conn is not self._sqlite_writer:
                conn.close()

    def _execute_single(self, sql: str, params: dict[str, Any]) -> int:
        """Run one write statement on its own (atomic by itself) and return
        its row count: what :meth:`_raw` does, without its generator, for
        the statement every sync checkpoint is."""
        if not self.is_sqlite:
            with self._raw(single=True) as cur:
                cur.execute(sql, params)
                return int(cur.rowcount)
        with self._writer:
            conn = self._sqlite_conn()
            try:
                return int(conn.driver_connection.execute(sql, params).rowcount)
            except self._dbapi_error as e:
                raise self._failed(conn, None, e) from e

    def _sqlite_conn(self) -> Any:
        """The SQLite writer connection (the caller holds ``_writer``). One
        writer at a time anyway: it is kept instead of a pool check-out and
        check-in per transaction."""
        conn = self._sqlite_writer
        if conn is None:
            conn = self._sqlite_writer = self._connect()
        return conn

    def _connect(self) -> Any:
        """A pooled DB-API connection. Failing to open one (server down,
        too many connections, pool exhausted) is a
        :class:`~sqlalchemy.exc.DBAPIError` or
        :class:`~sqlalchemy.exc.TimeoutError`, like Core's own errors, so
        every caller answers it the same way (``503``)."""
        try:
            return self.engine.raw_connection()
        except self._dbapi_error as e:
            raise self._wrap(e) from e

    def _failed(self, conn: Any, cur: Any, error: Any) -> BaseException:
        """Discard the connection a driver error came from (and forget it if
        it is the kept SQLite writer); returns the error to raise."""
        if conn is self._sqlite_writer:
            self._sqlite_writer = None
            self._discard(conn, cur, error)
            conn.close()
        else:
            self._discard(conn, cur, error)
        return self._wrap(error)

    def _discard(self, conn: Any, cur: Any, error: Any) -> None:
        """Invalidate a connection a driver error came from; after a server
        restart recycle the whole pool, as SQLAlchemy's own path does."""
        disconnected = self.engine.dialect.is_disconnect(
            error, conn.dbapi_connection, cur
        )
        if conn.is_valid:
            conn.invalidate(error)
        if disconnected:
            # The server went away: the other pooled connections are dead
            # too. A fresh pool replaces them (checked-out ones are closed
            # when they come back).
            self.engine.dispose()

    def _wrap(self, error: Any) -> BaseException:
        """A driver error as SQLAlchemy's :class:`~sqlalchemy.exc.DBAPIError`."""
        return sa.exc.DBAPIError.instance(
            None, None, error, self._dbapi_error, dialect=self.engine.dialect
        )

    def _raw_steps(
        self,
        cur: Any,
        run_id: str,
        inserts: Sequence[dict[str, Any]],
        updates: Sequence[dict[str, Any]],
    ) -> None:
        for row in inserts:
            cur.execute(self._sql_insert_step, dict(row, run_id=run_id))
        for row in updates:
            cur.execute(self._sql_update_step, dict(row, run_id=run_id))

    def _raw_insert_run(self, cur: Any, row: dict[str, Any]) -> None:
        params = dict.fromkeys(self._run_cols)
        params.update(row)
        if params["lease_owner"] is not None:
            params["lease_expires_at"] = _now() + self.lease_seconds
        cur.execute(self._sql_insert_run, params)

    @contextmanager
    def begin(self) -> Iterator[Connection]:
        """A short write transaction."""
        with self._writer, self.engine.begin() as conn:
            yield conn

    @contextmanager
    def read(self) -> Iterator[Connection]:
        """A read-only connection (no write lock on SQLite)."""
        with self._read.connect() as conn:
            yield conn

    def dispose(self, close: bool = True) -> None:
        """Drop pooled connections (``close=False`` after ``fork()``)."""
        writer, self._sqlite_writer = self._sqlite_writer, None
        if writer is not None and close:
            writer.close()
        self.engine.dispose(close=close)

    # -- notifications (PostgreSQL LISTEN/NOTIFY) ----------------------------

    #: Channel carrying the ids of runs that just finished.
    FINISHED_CHANNEL = "durable_finished"
    #: Channel carrying the ids of runs that became due now (an event came).
    WAKE_CHANNEL = "durable_wake"

    def _notify(self, conn: Connection, channel: str, payload: str) -> None:
        """Queue a notification, sent by PostgreSQL when ``conn`` commits."""
        if self.is_postgres:
            conn.execute(
                sa.text("SELECT pg_notify(:channel, :payload)"),
                {"channel": channel, "payload": payload},
            )

    def listen(
        self,
        on_notify: Any,
        stop: Any,
        timeout: float = 0.5,
    ) -> None:
        """Call ``on_notify(channel, payload)`` for each notification on
        our channels until ``stop`` (a :class:`threading.Event`) is set.
        Reconnects after database outages. PostgreSQL only."""
        import psycopg

        conninfo = self.engine.url.set(drivername="postgresql").render_as_string(
            hide_password=False
        )
        while not stop.is_set():
            try:
                with psycopg.connect(conninfo, autocommit=True) as conn:
                    conn.execute(f"LISTEN {self.FINISHED_CHANNEL}")
                    conn.execute(f"LISTEN {self.WAKE_CHANNEL}")
                    while not stop.is_set():
                        for note in conn.notifies(timeout=timeout):
                            on_notify(note.channel, note.payload)
            except psycopg.Error:
                stop.wait(1.0)

    # -- schema --------------------------------------------------------------

    def create_all(self) -> None:
        """Create the tables if needed and check the schema version."""
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

    def _insert_meta(self, conn: Connection, key: str, value: str) -> None:
        try:
            with conn.begin_nested():
                conn.execute(meta.insert().values(key=key, value=value))
        except IntegrityError:
            pass

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

    # -- starting and checkpointing ------------------------------------------

    def try_insert_idempotent_run(self, row: dict[str, Any]) -> bool:
        """Insert a run that carries an idempotency key. Returns ``False``
        when a live run already holds the key (an expired one is released)."""
        now = row["created_at"]
        for _ in range(2):
            try:
                with self.begin() as conn:
                    conn.execute(runs.insert(), row)
                return True
            except IntegrityError:
                with self.begin() as conn:
                    released = conn.execute(
                        runs.update()
                        .where(
                            runs.c.endpoint == row["endpoint"],
                            runs.c.idempotency_key == row["idempotency_key"],
                            runs.c.idempotency_expires_at < now,
                        )
                        .values(idempotency_key=None)
                    ).rowcount
                if not released:
                    return False
        return False

    def find_idempotent(self, endpoint: str, key: str) -> Any:
        with self.read() as conn:
            return conn.execute(
                sa.select(
                    runs.c.id,
                    runs.c.status,
                    runs.c.request_hash,
                    runs.c.idempotency_expires_at,
                    runs.c.response,
                ).where(runs.c.endpoint == endpoint, runs.c.idempotency_key == key)
            ).first()

    def write_steps(
        self,
        run_id: str,
        owner: str,
        inserts: Sequence[dict[str, Any]],
        updates: Sequence[dict[str, Any]],
        new_run: dict[str, Any] | None = None,
    ) -> None:
        """Checkpoint steps of a run in one transaction.

        :param new_run: the run row, when the run is not stored yet (it is
            inserted with its first checkpoint).
        :raises LeaseLost: when ``owner`` no longer holds the run's lease.
        """
        if new_run is None and len(inserts) + len(updates) == 1:
            # One fenced statement: the step is written only if we still hold
            # the run's lease.
            if inserts:
                sql, row = self._sql_insert_step_fenced, inserts[0]
            else:
                sql, row = self._sql_update_step_fenced, updates[0]
            row = dict(row, run_id=run_id, owner=owner)
            if self._execute_single(sql, row) != 1:
                raise LeaseLost(run_id)
            return
        if new_run is not None and self.is_postgres and len(inserts) == 1:
            params = {f"r_{c}": new_run.get(c) for c in self._run_cols}
            params["r_lease_expires_at"] = _now() + self.lease_seconds
            params.update(inserts[0], run_id=run_id)
            with self._raw(single=True) as cur:
                cur.execute(self._sql_insert_run_and_step, params)
            return
        now = _now()
        with self._raw() as cur:
            if new_run is not None:
                self._raw_insert_run(cur, new_run)
            else:
                cur.execute(self._sql_fence, {"now": now, "id": run_id, "owner": owner})
                if cur.rowcount != 1:
                    raise LeaseLost(run_id)
            self._raw_steps(cur, run_id, inserts, updates)

    def load_steps(self, run_id: str) -> list[dict[str, Any]]:
        """The steps of a run, in the order they first ran."""
        conn = self._connect()
        driver: Any = conn.driver_connection
        autocommit = self.is_postgres  # one statement: no transaction left open
        cur = None
        try:
            if autocommit:
                driver.autocommit = True
            cur = conn.cursor()
            cur.execute(self._sql_load_steps, {"run_id": run_id})
            rows = [
                dict(zip(self._step_names, row, strict=True)) for row in cur.fetchall()
            ]
            cur.close()
            return rows
        except self._dbapi_error as e:
            raise self._failed(conn, cur, e) from e
        finally:
            if autocommit and conn.is_valid:
                driver.autocommit = False
            conn.close()

    # -- suspending and finishing --------------------------------------------

    def suspend(
        self,
        run_id: str,
        owner: str,
        version: int,
        status: str,
        due_at: float,
        inserts: Sequence[dict[str, Any]],
        updates: Sequence[dict[str, Any]],
        new_waits: Sequence[dict[str, Any]],
        new_run: dict[str, Any] | None = None,
    ) -> float:
        """Write a run's pending steps and park it until ``due_at``.

        Returns the due time actually stored: ``now`` instead of ``due_at``
        when something (an event) woke the run while it was executing.

        :raises LeaseLost: when ``owner`` no longer holds the run's lease.
        """
        now = _now()
        parked = {
            "status": status,
            "due_at": due_at,
            "lease_owner": None,
            "lease_expires_at": None,
            "updated_at": now,
        }
        with self._raw() as cur:
            if new_run is not None:
                self._raw_insert_run(cur, dict(new_run, **parked))
            else:
                params = {"id": run_id, "owner": owner, "version": version}
                cur.execute(
                    self._sql_park, dict(params, status=status, due=due_at, now=now)
                )
                if cur.rowcount != 1:
                    # Still ours but woken meanwhile: run again right away.
                    parked.update(status="scheduled", due_at=now)
                    cur.execute(
                        self._sql_park_woken,
                        dict(params, status="scheduled", due=now, now=now),
                    )
                    if cur.rowcount != 1:
                        raise LeaseLost(run_id)
            self._raw_steps(cur, run_id, inserts, updates)
            for wait in new_waits:
                cur.execute(self._sql_insert_wait, dict(wait, run_id=run_id))
        return float(parked["due_at"])  # type: ignore[arg-type]

    def finish(
        self,
        run_id: str,
        owner: str,
        status: str,
        response: bytes,
        error: str | None,
        new_run: dict[str, Any] | None = None,
        inserts: Sequence[dict[str, Any]] = (),
        updates: Sequence[dict[str, Any]] = (),
        waits_possible: bool = True,
        notify: bool = True,
    ) -> None:
        """Store a run's final response and make it terminal.

        :param waits_possible: ``False`` when the run never waited for an
            event (no wait rows to delete).
        :param notify: tell other processes (PostgreSQL ``NOTIFY``); not
            needed for a run nobody can be waiting for (``NOTIFY`` takes a
            database-wide lock at commit).
        :raises LeaseLost: when ``owner`` no longer holds the run's lease.
        """
        single = new_run is None and not (inserts or updates or waits_possible)
        if single:
            # The one write of a run that does not wait for the disk: its
            # steps are committed already, and if the commit is lost (power
            # loss, database crash) the run, still leased, is replayed to
            # render the response again.
            params = self._finish_params(run_id, owner, status, response, error)
            if self.is_postgres:
                count = self._execute_single(
                    self._sql_finish_notify_quick if notify else self._sql_finish_quick,
                    params,
                )
            elif self.synchronous in ("FULL", "EXTRA"):
                with self._writer:
                    # Into the WAL now; synced by the next commit's sync.
                    self._execute_single("PRAGMA synchronous=NORMAL", {})
                    try:
                        count = self._execute_single(self._sql_finish, params)
                    finally:
                        self._execute_single(
                            f"PRAGMA synchronous={self.synchronous}", {}
                        )
            else:
                count = self._execute_single(self._sql_finish, params)
            if count != 1:
                raise LeaseLost(run_id)
            return
        with self._raw(single=single) as cur:
            if not self._raw_finish(
                cur,
                run_id,
                owner,
                status,
                response,
                error,
                new_run,
                inserts,
                updates,
                waits_possible,
                notify,
            ):
                raise LeaseLost(run_id)

    def _finish_params(
        self,
        run_id: str,
        owner: str,
        status: str,
        response: bytes,
        error: str | None,
        now: float | None = None,
    ) -> dict[str, Any]:
        """Parameters of the finish statements (all variants)."""
        return {
            "status": status,
            "response": response,
            "error": error,
            "now": _now() if now is None else now,
            "id": run_id,
            "owner": owner,
            "channel": self.FINISHED_CHANNEL,
        }

    def _raw_finish(
        self,
        cur: Any,
        run_id: str,
        owner: str,
        status: str,
        response: bytes,
        error: str | None,
        new_run: dict[str, Any] | None,
        inserts: Sequence[dict[str, Any]],
        updates: Sequence[dict[str, Any]],
        waits_possible: bool,
        notify: bool = True,
    ) -> bool:
        now = _now()
        if new_run is not None:
            final = {
                "status": status,
                "response": response,
                "error": error,
                "finished_at": now,
                "updated_at": now,
                "due_at": None,
                "lease_owner": None,
                "lease_expires_at": None,
            }
            self._raw_insert_run(cur, dict(new_run, **final))
        else:
            params = self._finish_params(run_id, owner, status, response, error, now)
            if self.is_postgres and notify:
                cur.execute(self._sql_finish_notify, params)
            else:
                cur.execute(self._sql_finish, params)
            if cur.rowcount != 1:
                return False
            if waits_possible:
                cur.execute(self._sql_delete_waits, {"id": run_id})
        self._raw_steps(cur, run_id, inserts, updates)
        if self.is_postgres and notify and new_run is not None:
            cur.execute(
                self._sql_notify, {"channel": self.FINISHED_CHANNEL, "payload": run_id}
            )
        return True

    def write_batch(self, items: Sequence[dict[str, Any]]) -> set[str]:
        """Commit queued checkpoints and final responses of many runs in one
        transaction (async checkpoint mode). Items of a run whose lease is
        lost are skipped; their run ids are returned."""
        lost: set[str] = set()
        fenced: set[str] = set()
        now = _now()
        with self._raw() as cur:
            for item in items:
                run_id = item["run_id"]
                if run_id in lost:
                    continue
                if item["kind"] == "finish":
                    if not self._raw_finish(
                        cur,
                        run_id,
                        item["owner"],
                        item["status"],
                        item["response"],
                        item["error"],
                        item["new_run"],
                        item["inserts"],
                        item["updates"],
                        item.get("waits_possible", True),
                        item.get("notify", True),
                    ):
                        lost.add(run_id)
                    continue
                if item["new_run"] is not None:
                    self._raw_insert_run(cur, item["new_run"])
                elif run_id not in fenced:
                    cur.execute(
                        self._sql_fence,
                        {"now": now, "id": run_id, "owner": item["owner"]},
                    )
                    if cur.rowcount != 1:
                        lost.add(run_id)
                        continue
                fenced.add(run_id)
                self._raw_steps(cur, run_id, item["inserts"], item["updates"])
        return lost

    # -- claiming ------------------------------------------------------------

    def claim(
        self, run_id: str, owner: str, lease_seconds: float, *, force: bool = False
    ) -> Any:
        """Take the lease of one due run. Returns its ``(id, version,
        attempt, deadline, cancel_requested, endpoint)`` or ``None`` when the
        run is not due, finished, or leased by someone else.

        :param force: claim even if not due yet (cancellation).
        """
        now = _now()
        params = {
            "id": run_id,
            "owner": owner,
            "expires": now + lease_seconds,
            "now": now,
            "due": float("inf") if force else now + 0.005,
        }
        with self._raw(single=True) as cur:
            cur.execute(self._sql_claim, params)
            row = cur.fetchone()
        return None if row is None else _Claimed(*row)

    def claim_due(self, owner: str, lease_seconds: float, limit: int) -> list[Any]:
        """Take the leases of up to ``limit`` due runs whose lease is free or
        expired (crashed processes). Safe to call from many processes at
        once: each run is claimed by one of them (``FOR UPDATE SKIP LOCKED``
        on PostgreSQL; one writer at a time on SQLite)."""
        if limit <= 0:
            return []
        now = _now()
        params = {
            "owner": owner,
            "expires": now + lease_seconds,
            "now": now,
            "limit": int(limit),
        }
        with self._raw(single=True) as cur:
            cur.execute(self._sql_claim_due, params)
            return [_Claimed(*row) for row in cur.fetchall()]

    def upcoming(self, horizon: float, limit: int) -> list[tuple[str, float]]:
        """Runs due within ``horizon`` seconds, for exact in-process timers."""
        now = _now()
        with self.read() as conn:
            rows = conn.execute(
                sa.select(runs.c.id, runs.c.due_at)
                .where(runs.c.due_at > now, runs.c.due_at <= now + horizon)
                .order_by(runs.c.due_at)
                .limit(limit)
            )
            return [(r.id, r.due_at) for r in rows]

    def renew(
        self, leases: Iterable[tuple[str, str]], lease_seconds: float
    ) -> tuple[set[str], set[str]]:
        """Extend the leases ``(run_id, owner)`` this process holds.

        Returns ``(lost, cancelled)``: runs whose lease is gone, and runs
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
                    .values(lease_expires_at=now + lease_seconds)
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

    def renew_one(self, run_id: str, owner: str) -> bool:
        """Extend one lease now (a step is about to start and the last
        heartbeat is too old to trust). Returns ``False`` when ``owner``
        no longer holds the run."""
        return (
            self._execute_single(
                self._sql_renew,
                {
                    "expires": _now() + self.lease_seconds,
                    "id": run_id,
                    "owner": owner,
                },
            )
            == 1
        )

    def release(self, run_id: str, owner: str) -> None:
        """Give a lease back without changing anything else (the run is
        picked up again by the next sweep)."""
        with self.begin() as conn:
            conn.execute(
                runs.update()
                .where(runs.c.id == run_id, runs.c.lease_owner == owner)
                .values(lease_owner=None, lease_expires_at=None)
            )

    # -- reading --------------------------------------------------------------

    def get_run(self, run_id: str) -> Any:
        with self.read() as conn:
            return conn.execute(sa.select(runs).where(runs.c.id == run_id)).first()

    def get_final(self, run_id: str) -> tuple[str, bytes | None] | None:
        """``(status, response)`` of a run, or ``None`` if unknown."""
        with self.read() as conn:
            row = conn.execute(
                sa.select(runs.c.status, runs.c.response).where(runs.c.id == run_id)
            ).first()
        return None if row is None else (row.status, row.response)

    # -- cancellation ---------------------------------------------------------

    def request_cancel(self, run_id: str) -> bool:
        """Flag a run for cancellation and make it due now. Returns
        ``False`` when the run is unknown or already finished."""
        now = _now()
        with self.begin() as conn:
            return (
                conn.execute(
                    runs.update()
                    .where(runs.c.id == run_id, runs.c.due_at.is_not(None))
                    .values(
                        cancel_requested=True,
                        due_at=sa.func.min(runs.c.due_at, now)
                        if self.is_sqlite
                        else sa.func.least(runs.c.due_at, now),
                        version=runs.c.version + 1,
                        updated_at=now,
                    )
                ).rowcount
                == 1
            )

    # -- events ---------------------------------------------------------------

    def insert_event(
        self, event_id: str, name: str, data: str, ts: float, dedupe_window: float
    ) -> bool:
        """Store an event. Returns ``False`` when an event with this id was
        stored within ``dedupe_window`` seconds (a duplicate)."""
        try:
            with self.begin() as conn:
                conn.execute(
                    events.insert().values(id=event_id, name=name, data=data, ts=ts)
                )
            return True
        except IntegrityError:
            with self.begin() as conn:
                replaced = conn.execute(
                    events.update()
                    .where(events.c.id == event_id, events.c.ts < ts - dedupe_window)
                    .values(name=name, data=data, ts=ts)
                ).rowcount
            return replaced == 1

    def waits_for(self, name: str, ts: float) -> list[sa.Row[Any]]:
        """Waits on event ``name`` that began no later than ``ts``."""
        with self.read() as conn:
            return list(
                conn.execute(
                    sa.select(waits.c.run_id, waits.c.step_id, waits.c.match).where(
                        waits.c.event == name,
                        waits.c.since <= ts,
                        waits.c.expires_at > ts,
                    )
                )
            )

    def events_since(self, name: str, since: float, until: float) -> list[sa.Row[Any]]:
        with self.read() as conn:
            return list(
                conn.execute(
                    sa.select(events.c.id, events.c.name, events.c.data, events.c.ts)
                    .where(
                        events.c.name == name, events.c.ts >= since, events.c.ts < until
                    )
                    .order_by(events.c.ts)
                )
            )

    def deliver(self, run_id: str, step_id: str, output: str) -> bool:
        """Complete a waiting step with an event and make its run due now.
        Returns ``False`` if the step was no longer waiting."""
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
            self._notify(conn, self.WAKE_CHANNEL, run_id)
        return True

    def purge_events(self, older_than: float) -> int:
        with self.begin() as conn:
            return conn.execute(
                events.delete().where(events.c.ts < older_than)
            ).rowcount


class _Claimed(NamedTuple):
    id: str
    version: int
    attempt: int
    deadline: float | None
    cancel_requested: bool
    endpoint: str
    request: bytes


#: What a claim returns: enough to replay the run without another query.
_CLAIM_COLUMNS = (
    runs.c.id,
    runs.c.version,
    runs.c.attempt,
    runs.c.deadline,
    runs.c.cancel_requested,
    runs.c.endpoint,
    runs.c.request,
)
