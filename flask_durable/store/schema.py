"""The tables, their version, and the migration from older versions.

Times are stored as POSIX timestamps (floats) so that comparisons are cheap
and portable. Run rows carry ``due_at``, the time the run should next be
executed: set while a run is not terminal (for a running run, the time it
started, so that a run whose process died is found by the same query once
its lease expires) and ``NULL`` once it is terminal. One partial index on
``due_at`` therefore serves the sweeper however many finished runs the table
holds.

Every run, wait and event belongs to an app id (``DURABLE_APP_ID``): apps
that share a database never see each other's rows.
"""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from ..records import StepRecord

#: Bump when the tables change, and teach :func:`migrate` the step; see
#: ``docs/upgrading.rst``.
SCHEMA_VERSION = 3

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
    sa.Column("app_id", sa.String(255), nullable=False),
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
    # Flow control (version 3): the endpoint's or function's limit key of a
    # run under concurrency or throttle limits, else NULL.
    sa.Column("flow_key", sa.String(255)),
    # Partial indexes: finished runs and runs without a key cost nothing.
    sa.Index(
        "ix_durable_runs_due",
        "due_at",
        sqlite_where=sa.text("due_at IS NOT NULL"),
        postgresql_where=sa.text("due_at IS NOT NULL"),
    ),
    sa.Index(
        "ux_durable_runs_idempotency_app",
        "app_id",
        "endpoint",
        "idempotency_key",
        unique=True,
        sqlite_where=sa.text("idempotency_key IS NOT NULL"),
        postgresql_where=sa.text("idempotency_key IS NOT NULL"),
    ),
    # Only unfinished runs under limits: admission's cost does not grow
    # with the runs that finished.
    sa.Index(
        "ix_durable_runs_flow",
        "app_id",
        "flow_key",
        "status",
        sqlite_where=sa.text("flow_key IS NOT NULL AND due_at IS NOT NULL"),
        postgresql_where=sa.text("flow_key IS NOT NULL AND due_at IS NOT NULL"),
    ),
)

#: What streaming steps published (version 3): ``chunk``, ``step`` and
#: ``reset`` events of a run, in order (``seq``, per run, from 1).
chunks = sa.Table(
    "durable_chunks",
    metadata,
    sa.Column("run_id", sa.String(32), primary_key=True),
    sa.Column("seq", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("app_id", sa.String(255), nullable=False),
    sa.Column("kind", sa.String(16), nullable=False),
    sa.Column("data", sa.Text, nullable=False),
    sa.Column("ts", sa.Float, nullable=False),
)

#: The state of each rate limit and throttle key (version 3): the next
#: instant a start is allowed without using the burst (GCRA's theoretical
#: arrival time).
flow = sa.Table(
    "durable_flow",
    metadata,
    sa.Column("app_id", sa.String(255), primary_key=True),
    sa.Column("key", sa.String(255), primary_key=True),
    sa.Column("tat", sa.Float, nullable=False),
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
    # Every failed attempt (JSON), kept once the step succeeded.
    sa.Column("history", sa.Text),
    sqlite_with_rowid=False,
)

waits = sa.Table(
    "durable_waits",
    metadata,
    sa.Column("run_id", sa.String(32), primary_key=True),
    sa.Column("step_id", sa.String(255), primary_key=True),
    sa.Column("app_id", sa.String(255), nullable=False),
    sa.Column("event", sa.String(255), nullable=False),
    sa.Column("match", sa.Text, nullable=False),
    sa.Column("since", sa.Float, nullable=False),
    sa.Column("expires_at", sa.Float, nullable=False),
    sa.Index("ix_durable_waits_app_event", "app_id", "event"),
)

events = sa.Table(
    "durable_events",
    metadata,
    sa.Column("app_id", sa.String(255), primary_key=True),
    sa.Column("id", sa.String(128), primary_key=True),
    sa.Column("name", sa.String(255), nullable=False),
    sa.Column("data", sa.Text, nullable=False),
    sa.Column("ts", sa.Float, nullable=False),
    sa.Index("ix_durable_events_app_name_ts", "app_id", "name", "ts"),
    sa.Index("ix_durable_events_ts", "ts"),
)

#: Step columns in the order :class:`~flask_durable.records.StepRecord`
#: takes them (its slots).
STEP_COLUMNS: tuple[str, ...] = StepRecord.__slots__

#: Run columns a claim returns, in the order of
#: :class:`~flask_durable.records.Claim` (without owner and claimed_at).
CLAIM_COLUMNS = (
    "id",
    "version",
    "attempt",
    "deadline",
    "cancel_requested",
    "endpoint",
    "request",
)


def migrate(conn: Connection, found: int, app_id: str) -> None:
    """Bring tables of schema version ``found`` up to
    :data:`SCHEMA_VERSION`, in the caller's transaction (which holds the
    write lock, so one process migrates while the others wait).

    :param app_id: the app id given to rows written before apps had one.
    """
    if found < 2:
        _to_2(conn, app_id)
    if found < 3:
        _to_3(conn)


def _to_3(conn: Connection) -> None:
    """Version 2 -> 3: flow control (the runs' limit key, the limits'
    state) and streaming (the chunks table)."""
    conn.exec_driver_sql("ALTER TABLE durable_runs ADD COLUMN flow_key VARCHAR(255)")
    for index in runs.indexes:
        if index.name == "ix_durable_runs_flow":
            index.create(conn, checkfirst=True)
    # create_all() made them already, before the migration began.
    flow.create(conn, checkfirst=True)
    chunks.create(conn, checkfirst=True)


def _to_2(conn: Connection, app_id: str) -> None:
    """Version 1 -> 2: app ids on runs, waits and events; attempt history
    on steps; the unused ``created_at`` index dropped."""
    x = conn.exec_driver_sql
    x("ALTER TABLE durable_runs ADD COLUMN app_id VARCHAR(255) NOT NULL DEFAULT ''")
    conn.execute(runs.update().values(app_id=app_id))
    x("DROP INDEX IF EXISTS ix_durable_runs_created")
    x("DROP INDEX IF EXISTS ux_durable_runs_idempotency")
    x("ALTER TABLE durable_steps ADD COLUMN history TEXT")
    x("ALTER TABLE durable_waits ADD COLUMN app_id VARCHAR(255) NOT NULL DEFAULT ''")
    conn.execute(waits.update().values(app_id=app_id))
    x("DROP INDEX IF EXISTS ix_durable_waits_event")
    # Events are kept two days, for deduplication only: the table is made
    # anew with the app id in its key (ids sent before are forgotten).
    x("DROP TABLE durable_events")
    for index in (*runs.indexes, *waits.indexes):
        if index.name in (
            "ux_durable_runs_idempotency_app",
            "ix_durable_waits_app_event",
        ):
            index.create(conn)
    events.create(conn)
