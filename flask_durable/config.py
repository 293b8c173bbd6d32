"""The configuration of flask-durable, read and validated once per app.

Each key is documented once, in ``docs/config.rst``.
"""

from __future__ import annotations

import difflib
import math
import os
import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Literal, cast
from urllib.parse import unquote, urlsplit

import sqlalchemy as sa
from flask import Flask

from .durations import parse_duration
from .flow import FlowControl

#: Every configuration key and its default.
DEFAULTS: dict[str, Any] = {
    "DURABLE_DATABASE_URI": None,
    "DURABLE_ENGINE_OPTIONS": {},
    "DURABLE_URL_PREFIX": "/durable",
    "DURABLE_APP_ID": None,
    "DURABLE_RETRIES": 4,
    "DURABLE_RETRY_BACKOFF": 1.0,
    "DURABLE_RETRY_BACKOFF_MAX": 300.0,
    "DURABLE_WAIT_TIMEOUT": 25.0,
    "DURABLE_POLL_INTERVAL": 1.0,
    "DURABLE_LEASE_SECONDS": 15.0,
    "DURABLE_SCHEDULER": True,
    "DURABLE_WORKERS": 8,
    "DURABLE_MAX_PARALLEL": 16,
    "DURABLE_CHECKPOINT": "sync",
    "DURABLE_CHECKPOINT_BATCH": 256,
    "DURABLE_CHECKPOINT_INTERVAL": 0.002,
    "DURABLE_GROUP_COMMIT": False,
    "DURABLE_SQLITE_SYNCHRONOUS": "NORMAL",
    "DURABLE_SQLITE_BUSY_TIMEOUT": 30.0,
    "DURABLE_EVENT_KEY": None,
    "DURABLE_SECRET_KEY": None,
    "DURABLE_IDEMPOTENCY_TTL": 86400,
    "DURABLE_MAX_STEPS": 1000,
    "DURABLE_MAX_STEP_OUTPUT": 4 * 1024 * 1024,
    "DURABLE_MAX_RUN_STATE": 32 * 1024 * 1024,
    "DURABLE_MAX_REQUEST_BODY": 1024 * 1024,
    "DURABLE_MAX_EVENT_SIZE": 1024 * 1024,
    "DURABLE_SECRET_KEY_FALLBACKS": [],
    "DURABLE_SENSITIVE_HEADERS": [],
    "DURABLE_REPLAY_HEADERS": None,
    "DURABLE_ENCRYPT_PAYLOADS": False,
    "DURABLE_RETENTION": "7d",
    "DURABLE_DASHBOARD": True,
    "DURABLE_METRICS": False,
    "DURABLE_OTEL": False,
    "DURABLE_WAIT_TOKEN_TTL": None,
    "DURABLE_MAX_HELD_WAITS": 4,
}

_PREFIX = "DURABLE_"
_SQLITE_SYNCHRONOUS = ("OFF", "NORMAL", "FULL", "EXTRA")


@dataclass(frozen=True, slots=True)
class Config:
    """The validated configuration of one app.

    Each attribute is the ``DURABLE_*`` key of the same name, in lower case
    and without the prefix (``DURABLE_LEASE_SECONDS`` is
    :attr:`lease_seconds`); :doc:`config` documents them. Build one with
    :meth:`from_app`. Two values are resolved: :attr:`database_uri` is
    never ``None`` and :attr:`app_id` defaults to ``app.import_name``.
    """

    database_uri: str
    engine_options: Mapping[str, Any]
    url_prefix: str
    app_id: str
    retries: int
    retry_backoff: float
    retry_backoff_max: float
    wait_timeout: float
    poll_interval: float
    lease_seconds: float
    scheduler: bool
    workers: int
    max_parallel: int
    checkpoint: Literal["sync", "async"]
    checkpoint_batch: int
    checkpoint_interval: float
    group_commit: bool
    sqlite_synchronous: str
    sqlite_busy_timeout: float
    event_key: str | None
    secret_key: str | bytes | None
    idempotency_ttl: float
    max_steps: int
    max_step_output: int
    max_run_state: int
    max_request_body: int
    max_event_size: int
    secret_key_fallbacks: tuple[str | bytes, ...]
    sensitive_headers: frozenset[str]
    replay_headers: frozenset[str] | None
    encrypt_payloads: bool
    #: Seconds a terminal run is kept (``None``: for ever).
    retention: float | None
    #: Serve the dashboard and its JSON API under the prefix.
    dashboard: bool
    #: Serve Prometheus metrics at ``<prefix>/metrics``.
    metrics: bool
    #: Emit OpenTelemetry spans per run and step.
    otel: bool
    #: Seconds a wait token is valid (the retention when not set; ``None``:
    #: for ever).
    wait_token_ttl: float | None
    #: Wait requests that may long-poll at once in one process.
    max_held_waits: int

    @classmethod
    def from_app(cls, app: Flask) -> Config:
        """Apply the defaults to ``app.config`` and read every key once.

        When ``DURABLE_DATABASE_URI`` is ``None`` the database is
        ``durable.sqlite3`` in ``app.instance_path``, and that folder is
        created. An unknown ``DURABLE_*`` key close to a known one gets a
        :class:`UserWarning`.

        :param app: the Flask app whose ``config`` is read.
        :raises ValueError: for a bad value; the message names the key, what
            it expects and what it was given.
        """
        config = app.config
        for key, default in DEFAULTS.items():
            config.setdefault(
                key, dict(default) if isinstance(default, dict) else default
            )
        _warn_unknown_keys(config)
        retry_backoff = _number(config, "DURABLE_RETRY_BACKOFF", 0)
        return cls(
            engine_options=_engine_options(config),
            url_prefix=_url_prefix(config),
            app_id=_app_id(app),
            retries=_int(config, "DURABLE_RETRIES", 0),
            retry_backoff=retry_backoff,
            retry_backoff_max=_backoff_max(config, retry_backoff),
            wait_timeout=_number(config, "DURABLE_WAIT_TIMEOUT", 0),
            poll_interval=_number(config, "DURABLE_POLL_INTERVAL", 0.01),
            lease_seconds=_number(config, "DURABLE_LEASE_SECONDS", 0.1),
            scheduler=_bool(config, "DURABLE_SCHEDULER"),
            workers=_int(config, "DURABLE_WORKERS", 1),
            max_parallel=_int(config, "DURABLE_MAX_PARALLEL", 1),
            checkpoint=_checkpoint(config),
            checkpoint_batch=_int(config, "DURABLE_CHECKPOINT_BATCH", 1),
            checkpoint_interval=_number(config, "DURABLE_CHECKPOINT_INTERVAL", 0),
            group_commit=_bool(config, "DURABLE_GROUP_COMMIT"),
            sqlite_synchronous=_sqlite_synchronous(config),
            sqlite_busy_timeout=_number(config, "DURABLE_SQLITE_BUSY_TIMEOUT", 0),
            event_key=_event_key(config),
            secret_key=_secret_key(config),
            idempotency_ttl=_number(config, "DURABLE_IDEMPOTENCY_TTL", 0),
            max_steps=_int(config, "DURABLE_MAX_STEPS", 1),
            max_step_output=_int(config, "DURABLE_MAX_STEP_OUTPUT", 1),
            max_run_state=_int(config, "DURABLE_MAX_RUN_STATE", 1),
            max_request_body=_int(config, "DURABLE_MAX_REQUEST_BODY", 0),
            max_event_size=_int(config, "DURABLE_MAX_EVENT_SIZE", 1),
            secret_key_fallbacks=_fallbacks(config),
            sensitive_headers=_header_names(config, "DURABLE_SENSITIVE_HEADERS")
            or frozenset(),
            replay_headers=_header_names(config, "DURABLE_REPLAY_HEADERS"),
            encrypt_payloads=_bool(config, "DURABLE_ENCRYPT_PAYLOADS"),
            retention=_optional_duration(config, "DURABLE_RETENTION"),
            dashboard=_bool(config, "DURABLE_DASHBOARD"),
            metrics=_bool(config, "DURABLE_METRICS"),
            otel=_bool(config, "DURABLE_OTEL"),
            wait_token_ttl=_optional_duration(config, "DURABLE_WAIT_TOKEN_TTL")
            if config["DURABLE_WAIT_TOKEN_TTL"] is not None
            else _optional_duration(config, "DURABLE_RETENTION"),
            max_held_waits=_int(config, "DURABLE_MAX_HELD_WAITS", 0),
            # Last, so that a bad value elsewhere creates no instance folder.
            database_uri=_database_uri(app),
        )


def _bad(key: str, expected: str, value: object) -> ValueError:
    return ValueError(f"{key} must be {expected}, not {value!r}")


def _warn_unknown_keys(config: Mapping[str, Any]) -> None:
    known = [key[len(_PREFIX) :] for key in DEFAULTS]
    for key in config:
        if not key.startswith(_PREFIX) or key in DEFAULTS:
            continue
        # Compare without the shared prefix, which would make anything close.
        close = difflib.get_close_matches(key[len(_PREFIX) :], known, n=1)
        if close:
            warnings.warn(
                f"unknown configuration key {key}; did you mean {_PREFIX}{close[0]}?",
                UserWarning,
                stacklevel=4,  # the caller of init_app
            )


def _int(config: Mapping[str, Any], key: str, minimum: int) -> int:
    value = config[key]
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise _bad(key, f"an integer >= {minimum}", value)
    return value


def _number(config: Mapping[str, Any], key: str, minimum: float) -> float:
    value = config[key]
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or value < minimum
    ):
        raise _bad(key, f"a number >= {minimum}", value)
    return float(value)


def _backoff_max(config: Mapping[str, Any], backoff: float) -> float:
    key = "DURABLE_RETRY_BACKOFF_MAX"
    value = _number(config, key, 0)
    if value < backoff:
        expected = f"a number >= DURABLE_RETRY_BACKOFF ({backoff})"
        raise _bad(key, expected, config[key])
    return value


def _bool(config: Mapping[str, Any], key: str) -> bool:
    value = config[key]
    if not isinstance(value, bool):
        raise _bad(key, "True or False", value)
    return value


def _checkpoint(config: Mapping[str, Any]) -> Literal["sync", "async"]:
    value = config["DURABLE_CHECKPOINT"]
    if value not in ("sync", "async"):
        raise _bad("DURABLE_CHECKPOINT", "'sync' or 'async'", value)
    return cast('Literal["sync", "async"]', value)


def _sqlite_synchronous(config: Mapping[str, Any]) -> str:
    key = "DURABLE_SQLITE_SYNCHRONOUS"
    value = config[key]
    if not isinstance(value, str) or value.upper() not in _SQLITE_SYNCHRONOUS:
        raise _bad(key, "one of " + ", ".join(_SQLITE_SYNCHRONOUS), value)
    return value.upper()


def _url_prefix(config: Mapping[str, Any]) -> str:
    key = "DURABLE_URL_PREFIX"
    value = config[key]
    if not isinstance(value, str) or not value.startswith("/") or value.endswith("/"):
        raise _bad(key, "a path starting with '/' and not ending with '/'", value)
    return value


def _app_id(app: Flask) -> str:
    key = "DURABLE_APP_ID"
    value = app.config[key]
    if value is None:
        value = app.import_name
    if not isinstance(value, str) or not 1 <= len(value) <= 255:
        raise _bad(key, "None or a str of 1 to 255 characters", value)
    return value


def _event_key(config: Mapping[str, Any]) -> str | None:
    value = config["DURABLE_EVENT_KEY"]
    if value is not None and (not isinstance(value, str) or not value):
        raise _bad("DURABLE_EVENT_KEY", "None or a non-empty str", value)
    return value


def _secret_key(config: Mapping[str, Any]) -> str | bytes | None:
    value = config["DURABLE_SECRET_KEY"]
    if value is not None and (not isinstance(value, (str, bytes)) or not value):
        raise _bad("DURABLE_SECRET_KEY", "None or a non-empty str or bytes", value)
    return value


def _fallbacks(config: Mapping[str, Any]) -> tuple[str | bytes, ...]:
    value = config["DURABLE_SECRET_KEY_FALLBACKS"]
    if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
        raise _bad("DURABLE_SECRET_KEY_FALLBACKS", "a list of str or bytes keys", value)
    for key in value:
        if not isinstance(key, (str, bytes)) or not key:
            raise _bad(
                "DURABLE_SECRET_KEY_FALLBACKS", "a list of non-empty keys", value
            )
    return tuple(value)


_HEADER_NAME = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")


def _header_names(config: Mapping[str, Any], key: str) -> frozenset[str] | None:
    """A list of HTTP header names, lower-cased (``None`` stays ``None``)."""
    value = config[key]
    if value is None:
        return None
    if isinstance(value, str) or not isinstance(value, (list, tuple, set, frozenset)):
        raise _bad(key, "a list of header names", value)
    for name in value:
        if not isinstance(name, str) or not _HEADER_NAME.match(name):
            raise _bad(key, "a list of header names", value)
    return frozenset(name.lower() for name in value)


def _optional_duration(config: Mapping[str, Any], key: str) -> float | None:
    """A duration (``"7d"``, seconds, ``timedelta``) or ``None`` (for ever)."""
    value = config[key]
    if value is None:
        return None
    try:
        seconds = parse_duration(value)
    except (TypeError, ValueError) as e:
        raise _bad(key, f"None or a duration ({e})", value) from None
    if seconds <= 0:
        raise _bad(key, "None or a duration > 0", value)
    return seconds


def _engine_options(config: Mapping[str, Any]) -> Mapping[str, Any]:
    value = config["DURABLE_ENGINE_OPTIONS"]
    if not isinstance(value, Mapping):
        raise _bad("DURABLE_ENGINE_OPTIONS", "a mapping (dict)", value)
    return MappingProxyType(dict(value))


def _database_uri(app: Flask) -> str:
    key = "DURABLE_DATABASE_URI"
    value = app.config[key]
    if value is None:
        # Our default location: creating it is ours to do.
        os.makedirs(app.instance_path, exist_ok=True)
        return "sqlite:///" + os.path.join(app.instance_path, "durable.sqlite3")
    if not isinstance(value, str):
        raise _bad(key, "None or a SQLAlchemy database URL (str)", value)
    try:
        url = sa.engine.make_url(value)
    except (sa.exc.ArgumentError, ValueError) as e:
        shown = re.sub(r"//[^/@]*@", "//***@", value)  # no password in logs
        raise ValueError(
            f"{key} must be a SQLAlchemy database URL, not {shown!r} ({e})"
        ) from None
    if url.get_backend_name() == "sqlite":
        _check_sqlite_file(key, url)
    return value


def _check_sqlite_file(key: str, url: sa.engine.URL) -> None:
    database = url.database or ""
    if database.startswith("file:"):  # a SQLite URI filename (?uri=true)
        database = unquote(urlsplit(database).path)
    if database in ("", ":memory:") or url.query.get("mode") == "memory":
        raise ValueError(
            f"{key} must name a SQLite file, not an in-memory database"
            f" ({url.render_as_string()!r}): the threads that resume runs"
            " do not share one"
        )
    directory = os.path.dirname(os.path.abspath(database))
    if not os.path.isdir(directory):
        raise ValueError(
            f"{key} names a SQLite file in a directory that does not exist:"
            f" {directory!r} (create it, or use another path)"
        )


@dataclass(frozen=True, slots=True)
class EndpointOptions:
    """The options of one ``@durable.endpoint``.

    :ivar retries: retries per step (``None``: ``DURABLE_RETRIES``).
    :ivar id: the endpoint's stable id (``None``: its Flask endpoint name).
    :ivar timeout_seconds: cancel runs older than this (``None``: never).
    :ivar checkpoint: ``"sync"`` or ``"async"`` (``None``:
        ``DURABLE_CHECKPOINT``).
    :ivar flow: its flow-control limits (:mod:`flask_durable.flow`).
    """

    retries: int | None = None
    id: str | None = None
    timeout_seconds: float | None = None
    checkpoint: Literal["sync", "async"] | None = None
    #: Concurrency, throttle and rate limits (``None``: none).
    flow: FlowControl | None = None
