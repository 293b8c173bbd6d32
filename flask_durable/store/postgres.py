"""PostgreSQL: many processes on many hosts, ``FOR UPDATE SKIP LOCKED``
claims, and ``LISTEN``/``NOTIFY`` so that a wait URL served by one process
learns at once that another process finished its run.

Round trips are what cost here (~0.25 ms each on loopback): one-statement
writes run in autocommit, a new run goes in with its first step in one
statement, and a lone final response is committed without waiting for the
WAL flush.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from ..records import Checkpoint, Finish
from .base import (
    _FINISH_ORDER,
    FINISHED_CHANNEL,
    STREAM_CHANNEL,
    WAKE_CHANNEL,
    Store,
    _now,
)
from .schema import STEP_COLUMNS, runs, steps


class PostgresStore(Store):
    """The store on a PostgreSQL database (psycopg 3)."""

    def __init__(
        self,
        url: sa.engine.URL,
        engine_options: dict[str, Any],
        app_id: str,
        lease_seconds: float,
    ) -> None:
        options = dict(engine_options)
        options.setdefault("pool_size", 10)
        options.setdefault("max_overflow", 20)
        engine = sa.create_engine(url, **options)
        super().__init__(engine, app_id, lease_seconds)

    def _sql(self, text: str) -> str:
        return re.sub(r"(?<!:):(\w+)", r"%(\1)s", text)

    _marker = "%s"

    def _writer_lock(self) -> Any:
        return nullcontext()

    def _least(self, a: Any, b: Any) -> Any:
        return sa.func.least(a, b)

    def _skip_locked(self) -> str:
        return " FOR UPDATE SKIP LOCKED"

    def _relax_commit(self, conn: Connection) -> None:
        conn.exec_driver_sql("SET LOCAL synchronous_commit = off")

    def _lock_key(self, conn: Connection, key: str) -> None:
        conn.execute(
            sa.text("SELECT pg_advisory_xact_lock(hashtextextended(:key, 0))"),
            {"key": f"durable-flow\x1f{self.app_id}\x1f{key}"},
        )

    def _select_values(self, columns: Any) -> str:
        # Bare parameters in a SELECT list would be typed as text.
        dialect = self.engine.dialect
        return ", ".join(
            f"CAST(:{c} AS {steps.c[c].type.compile(dialect=dialect)})" for c in columns
        )

    def _prepare(self) -> None:
        super()._prepare()
        sql = self._sql
        run_cols = [c.name for c in runs.columns]
        step_cols = ["run_id", *STEP_COLUMNS]
        # A new run and its first step in one statement: one round trip
        # instead of four (BEGIN, two INSERTs, COMMIT).
        self._sql_insert_run_and_step = sql(
            f"WITH new_run AS (INSERT INTO durable_runs ({', '.join(run_cols)})"
            f" VALUES ({', '.join(':r_' + c for c in run_cols)}))"
            f" INSERT INTO durable_steps ({', '.join(step_cols)})"
            f" VALUES ({', '.join(':' + c for c in step_cols)})"
        )
        bind = self._positional
        finish = self._finish_text()
        # Positional like the finish statement (_FINISH_ORDER): the channel
        # is written in.
        notify = f"SELECT pg_notify('{FINISHED_CHANNEL}', id) FROM done"
        self._sql_finish_notify = bind(
            f"WITH done AS ({finish} RETURNING id) {notify}", _FINISH_ORDER
        )
        # A lone final response is committed without waiting for the WAL
        # flush (synchronous_commit=off for this transaction only): the run's
        # steps are committed already; if the server loses this commit, the
        # run is still leased and is replayed, every step memoized, to store
        # its response again.
        quick = "quick AS (SELECT set_config('synchronous_commit', 'off', true))"
        finish_quick = self._finish_text(" FROM quick")
        self._sql_finish_quick = bind(f"WITH {quick} {finish_quick}", _FINISH_ORDER)
        self._sql_finish_notify_quick = bind(
            f"WITH {quick}, done AS ({finish_quick} RETURNING durable_runs.id)"
            f" {notify}",
            _FINISH_ORDER,
        )
        self._sql_notify = sql("SELECT pg_notify(:channel, :payload)")

    # -- connections ---------------------------------------------------------

    @contextmanager
    def _raw(self, single: bool = False) -> Iterator[Any]:
        conn = self._connect()
        cur = None
        try:
            if single:
                conn.driver_connection.autocommit = True
            cur = conn.cursor()
            yield cur
            if not single:
                conn.commit()
        except self._dbapi_error as e:
            failed, cur = cur, None
            raise self._discard(conn, failed, e) from e
        except BaseException:
            conn.rollback()
            raise
        finally:
            if cur is not None:
                cur.close()
            if single and conn.driver_connection is not None:
                conn.driver_connection.autocommit = False
            conn.close()

    @contextmanager
    def _reading(self) -> Iterator[Any]:
        # Autocommit: one statement, no transaction left to roll back.
        with self._raw(single=True) as cur:
            yield cur

    # -- writes that differ ------------------------------------------------------

    def _insert_run_and_step(self, c: Checkpoint) -> bool:
        assert c.new_run is not None
        now = _now()
        params = {f"r_{k}": v for k, v in self._run_params(c.new_run, now).items()}
        params.update(self._step_params(c.run_id, c.inserts[0]))
        self._execute_single(self._sql_insert_run_and_step, params)
        return True

    def _write_lone_finish(self, f: Finish) -> bool:
        sql = self._sql_finish_notify_quick if f.notify else self._sql_finish_quick
        return self._execute_single(sql, self._finish_row(f, _now())) == 1

    def _finish_sql(self, notify: bool) -> str:
        return self._sql_finish_notify if notify else self._sql_finish

    def _raw_notify(self, cur: Any, channel: str, payload: str) -> None:
        cur.execute(self._sql_notify, {"channel": channel, "payload": payload})

    def _notify_many(
        self, conn: Connection, channel: str, payloads: Sequence[str]
    ) -> None:
        if payloads:
            conn.execute(
                sa.text(
                    "SELECT pg_notify(:channel, p)"
                    " FROM unnest(CAST(:payloads AS text[])) AS p"
                ),
                {"channel": channel, "payloads": list(payloads)},
            )

    def _notify(self, conn: Connection, channel: str, payload: str) -> None:
        conn.execute(
            sa.text("SELECT pg_notify(:channel, :payload)"),
            {"channel": channel, "payload": payload},
        )

    def _lock_meta(self, conn: Connection) -> None:
        conn.exec_driver_sql("LOCK TABLE durable_meta IN SHARE ROW EXCLUSIVE MODE")

    # -- LISTEN ------------------------------------------------------------------

    thread_name = "durable-listener"

    def _background(
        self, on_notify: Callable[[str, str], None], stop: threading.Event
    ) -> None:
        self._listen(on_notify, stop)

    def _listen(
        self,
        on_notify: Callable[[str, str], None],
        stop: threading.Event,
        timeout: float = 0.5,
    ) -> None:
        """Deliver notifications until ``stop`` is set; reconnect after
        database outages."""
        import psycopg

        conninfo = self.engine.url.set(drivername="postgresql").render_as_string(
            hide_password=False
        )
        while not stop.is_set():
            try:
                with psycopg.connect(conninfo, autocommit=True) as conn:
                    conn.execute(f"LISTEN {FINISHED_CHANNEL}")
                    conn.execute(f"LISTEN {WAKE_CHANNEL}")
                    conn.execute(f"LISTEN {STREAM_CHANNEL}")
                    while not stop.is_set():
                        for note in conn.notifies(timeout=timeout):
                            on_notify(note.channel, note.payload)
            except psycopg.Error:
                stop.wait(1.0)
