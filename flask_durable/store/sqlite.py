"""SQLite: one file, WAL, one writer at a time.

Threads of this process queue on a lock for the single write slot instead of
SQLite's busy handler (which polls with sleeps and starves threads under
load: a heartbeat could wait past its lease); other processes still meet
``busy_timeout``. Writers start with ``BEGIN IMMEDIATE`` so that no lock is
ever upgraded (no ``SQLITE_BUSY`` deadlock between processes), and write on
one kept connection instead of a pool check-out per transaction.

SQLite's automatic WAL checkpoint would run in whichever thread commits
when the WAL passes its threshold, and sync the database file twice there:
a request would pay for it. A background thread checkpoints instead, a few
times a second; the automatic one stays as a safety net at a high mark.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event as sa_event
from sqlalchemy.engine import Connection

from ..records import Checkpoint, Finish
from .base import Store, _now

#: The automatic checkpoint's mark (pages, ~16 MiB): only reached when no
#: process runs the checkpoint thread, or writes outpace it.
_AUTOCHECKPOINT_PAGES = 4000
#: Seconds between the checkpoint thread's checkpoints.
_CHECKPOINT_INTERVAL = 0.25

log = logging.getLogger("flask_durable")


class SQLiteStore(Store):
    """The store on a SQLite file.

    :param synchronous: ``PRAGMA synchronous`` (``"NORMAL"`` or ``"FULL"``).
    :param busy_timeout: seconds a writer waits for another process's lock.
    """

    def __init__(
        self,
        url: sa.engine.URL,
        engine_options: dict[str, Any],
        app_id: str,
        lease_seconds: float,
        synchronous: str,
        busy_timeout: float,
    ) -> None:
        options = dict(engine_options)
        options.setdefault("pool_size", 20)
        options.setdefault("max_overflow", 20)
        engine = sa.create_engine(url, **options)
        #: ``PRAGMA synchronous`` of every connection.
        self.synchronous = synchronous
        self._setup(engine, synchronous, int(busy_timeout * 1000))
        self._lock = threading.RLock()
        self._writer: Any = None
        self._path = url.database or ""
        super().__init__(engine, app_id, lease_seconds)

    @staticmethod
    def _setup(engine: sa.engine.Engine, synchronous: str, busy_ms: int) -> None:
        @sa_event.listens_for(engine, "connect")
        def _on_connect(dbapi_conn: Any, record: Any) -> None:
            # Transactions are ours to begin (BEGIN IMMEDIATE for writers).
            dbapi_conn.isolation_level = None
            cur = dbapi_conn.cursor()
            # The busy timeout first: switching to WAL needs the lock too.
            cur.execute(f"PRAGMA busy_timeout={busy_ms}")
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute(f"PRAGMA synchronous={synchronous}")
            cur.execute(f"PRAGMA wal_autocheckpoint={_AUTOCHECKPOINT_PAGES}")
            cur.close()

        @sa_event.listens_for(engine, "begin")
        def _on_begin(conn: Connection) -> None:
            if conn.get_execution_options().get("durable_readonly"):
                conn.exec_driver_sql("BEGIN")
            else:
                conn.exec_driver_sql("BEGIN IMMEDIATE")

    def _writer_lock(self) -> threading.RLock:
        return self._lock

    def _least(self, a: Any, b: Any) -> Any:
        return sa.func.min(a, b)

    # -- the kept writer connection -------------------------------------------

    def _writer_conn(self) -> Any:
        """The writer connection (the caller holds the lock)."""
        conn = self._writer
        if conn is None:
            conn = self._writer = self._connect()
        return conn

    def _drop_writer(self, conn: Any, cur: Any, error: Any) -> BaseException:
        """Forget the writer connection a driver error came from."""
        self._writer = None
        failure = self._discard(conn, cur, error)
        conn.close()
        return failure

    @contextmanager
    def _raw(self, single: bool = False) -> Iterator[Any]:
        with self._lock:
            conn = self._writer_conn()
            cur = None
            try:
                cur = conn.cursor()
                if not single:
                    cur.execute("BEGIN IMMEDIATE")
                yield cur
                if not single:
                    conn.commit()
            except self._dbapi_error as e:
                failed, cur = cur, None
                raise self._drop_writer(conn, failed, e) from e
            except BaseException:
                if conn.dbapi_connection is not None:
                    conn.rollback()
                raise
            finally:
                if cur is not None:
                    cur.close()

    def _execute_single(self, sql: str, params: Sequence[Any] | dict[str, Any]) -> int:
        # Autocommit: one statement is atomic on its own; no generator, no
        # cursor object kept (this is every sync checkpoint).
        with self._lock:
            conn = self._writer_conn()
            try:
                return int(conn.driver_connection.execute(sql, params).rowcount)
            except self._dbapi_error as e:
                raise self._drop_writer(conn, None, e) from e

    def _insert_run_and_step(self, c: Checkpoint) -> bool:
        # What _raw() does for these two statements, without its generator
        # and cursor (this is every run's first checkpoint).
        run = c.new_run
        assert run is not None
        now = _now()
        run_row = self._run_row(run, now, due_at=run.created_at)
        step_row = self._step_row(c.run_id, c.inserts[0])
        with self._lock:
            conn = self._writer_conn()
            raw = conn.driver_connection
            try:
                raw.execute("BEGIN IMMEDIATE")
                try:
                    raw.execute(self._sql_insert_run, run_row)
                    raw.execute(self._sql_insert_step, step_row)
                    raw.commit()
                except self._dbapi_error:
                    raise
                except BaseException:
                    raw.rollback()
                    raise
            except self._dbapi_error as e:
                raise self._drop_writer(conn, None, e) from e
        return True

    def _write_lone_finish(self, f: Finish) -> bool:
        params = self._finish_row(f, _now())
        if self.synchronous not in ("FULL", "EXTRA"):
            return self._execute_single(self._sql_finish, params) == 1
        # The one write that does not wait for the disk: the run's steps are
        # synced already, and if this commit is lost (power loss) the run,
        # still leased, is replayed to render its response again. It goes
        # into the WAL now and is synced by the next commit's sync.
        with self._lock:
            self._execute_single("PRAGMA synchronous=NORMAL", ())
            try:
                return self._execute_single(self._sql_finish, params) == 1
            finally:
                self._execute_single(f"PRAGMA synchronous={self.synchronous}", ())

    @contextmanager
    def _reading(self) -> Iterator[Any]:
        conn = self._connect()
        cur = None
        try:
            cur = conn.cursor()
            yield cur
        except self._dbapi_error as e:
            failed, cur = cur, None
            raise self._discard(conn, failed, e) from e
        finally:
            if cur is not None:
                cur.close()
            conn.close()

    # -- the WAL checkpoint thread ---------------------------------------------

    thread_name = "durable-wal-checkpoint"

    def _background(
        self, on_notify: Callable[[str, str], None], stop: threading.Event
    ) -> None:
        self._checkpoint_loop(stop)

    def _checkpoint_loop(self, stop: threading.Event) -> None:
        # A connection of its own, outside the pool: the pool's size is the
        # app's to set (DURABLE_ENGINE_OPTIONS), and a checkpoint must never
        # take a connection a request is waiting for.
        conn: sqlite3.Connection | None = None
        while not stop.wait(_CHECKPOINT_INTERVAL):
            try:
                if conn is None:
                    conn = sqlite3.connect(
                        self._path, isolation_level=None, check_same_thread=False
                    )
                    conn.execute("PRAGMA busy_timeout=100")
                # PASSIVE: copies what it can without waiting for, or
                # blocking, readers and writers.
                conn.execute("PRAGMA wal_checkpoint(PASSIVE)")
            except sqlite3.Error as e:  # locked, disk full: try again later
                log.debug("WAL checkpoint skipped: %s", e)
                if conn is not None:
                    conn.close()
                    conn = None
        if conn is not None:
            conn.close()

    def dispose(self, close: bool = True) -> None:
        if close:
            with self._lock:
                writer, self._writer = self._writer, None
                if writer is not None:
                    writer.close()
        else:  # after fork(): the parent's lock may be held; start afresh
            self._lock = threading.RLock()
            self._writer = None
        super().dispose(close)
