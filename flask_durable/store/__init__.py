"""Where runs, steps, waits and events live: the only package that speaks
SQL.

:func:`open_store` picks the backend for the configured database:
:class:`~.sqlite.SQLiteStore` or :class:`~.postgres.PostgresStore`, both on
the shared queries of :class:`~.base.Store`.
"""

from __future__ import annotations

import sqlalchemy as sa

from ..config import Config
from .base import FINISHED_CHANNEL, STREAM_CHANNEL, UNAVAILABLE, WAKE_CHANNEL, Store
from .schema import SCHEMA_VERSION

__all__ = [
    "FINISHED_CHANNEL",
    "SCHEMA_VERSION",
    "UNAVAILABLE",
    "WAKE_CHANNEL",
    "STREAM_CHANNEL",
    "Store",
    "open_store",
]


def open_store(config: Config) -> Store:
    """The store for ``config.database_uri``."""
    url = sa.engine.make_url(config.database_uri)
    options = dict(config.engine_options)
    if url.get_backend_name() == "sqlite":
        from .sqlite import SQLiteStore

        return SQLiteStore(
            url,
            options,
            config.app_id,
            config.lease_seconds,
            config.sqlite_synchronous,
            config.sqlite_busy_timeout,
        )
    if url.get_backend_name() != "postgresql":
        raise ValueError(
            "DURABLE_DATABASE_URI must be a SQLite or PostgreSQL URL, not"
            f" {url.render_as_string(hide_password=True)!r}"
        )
    from .postgres import PostgresStore

    return PostgresStore(url, options, config.app_id, config.lease_seconds)
