"""The :class:`Durable` extension."""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar, overload

from flask import request

from .durations import Duration, parse_duration, to_datetime
from .replay import REPLAY_KEY, CaptureMiddleware, decode_response
from .runtime import _State, get_state
from .serde import load_json, load_value
from .store import TERMINAL_STATUSES

if TYPE_CHECKING:
    from flask import Flask

F = TypeVar("F", bound=Callable[..., Any])

_DEFAULTS: dict[str, Any] = {
    "DURABLE_DATABASE_URI": None,
    "DURABLE_ENGINE_OPTIONS": {},
    "DURABLE_URL_PREFIX": "/durable",
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
}


@dataclass(frozen=True)
class EndpointOptions:
    """Options of one ``@durable.endpoint``."""

    retries: int | None = None
    id: str | None = None
    timeout_seconds: float | None = None
    checkpoint: str | None = None


@dataclass(frozen=True)
class StepInfo:
    """One step of a run, as :meth:`Durable.get_run` reports it."""

    id: str
    status: str
    attempts: int
    output: Any
    error: dict[str, str] | None
    started_at: Any
    finished_at: Any
    due_at: Any


@dataclass(frozen=True)
class RunInfo:
    """A read-only view of a run (:meth:`Durable.get_run`).

    ``response`` is ``(status_code, headers, body)`` once the run is
    terminal, else ``None``.
    """

    id: str
    endpoint: str
    status: str
    attempt: int
    steps: list[StepInfo]
    created_at: Any
    finished_at: Any
    due_at: Any
    error: str | None
    response: tuple[int, list[tuple[str, str]], bytes] | None

    @property
    def is_terminal(self) -> bool:
        return self.status in TERMINAL_STATUSES


class Durable:
    """Durable Endpoints for Flask.

    ::

        durable = Durable()

        def create_app():
            app = Flask(__name__)
            durable.init_app(app)
            return app

    One instance may serve several apps; each app's state lives in
    ``app.extensions["durable"]``.
    """

    def __init__(self, app: Flask | None = None) -> None:
        if app is not None:
            self.init_app(app)

    def init_app(self, app: Flask) -> None:
        """Set up flask-durable on ``app``.

        Configuration keys (all optional):

        ``DURABLE_DATABASE_URI``
            SQLAlchemy URL of the database holding runs, steps and events.
            Default: ``durable.sqlite3`` in ``app.instance_path``.
        ``DURABLE_ENGINE_OPTIONS``
            Extra keyword arguments for :func:`sqlalchemy.create_engine`.
        ``DURABLE_URL_PREFIX``
            Where the wait and events routes are mounted (``/durable``).
        ``DURABLE_RETRIES``
            Retries per step after the first attempt (``4``).
        ``DURABLE_RETRY_BACKOFF`` / ``DURABLE_RETRY_BACKOFF_MAX``
            First backoff and its cap, in seconds (``1.0`` / ``300.0``);
            doubles per attempt, with jitter.
        ``DURABLE_WAIT_TIMEOUT``
            Seconds one wait request long-polls (``25``).
        ``DURABLE_POLL_INTERVAL``
            Seconds between sweeps for due runs (``1.0``).
        ``DURABLE_LEASE_SECONDS``
            A run executing in a process that died is resumed elsewhere after
            this many seconds (``15``).
        ``DURABLE_SCHEDULER``
            Run the scheduler in this process (``True``).
        ``DURABLE_WORKERS``
            Threads resuming runs in this process (``8``).
        ``DURABLE_MAX_PARALLEL``
            Threads of one ``step.parallel`` call at most (``16``).
        ``DURABLE_CHECKPOINT``
            ``"sync"`` (commit each step before ``step.run`` returns) or
            ``"async"``.
        ``DURABLE_CHECKPOINT_BATCH`` / ``DURABLE_CHECKPOINT_INTERVAL``
            Async mode: checkpoints committed per transaction at most
            (``256``) and seconds the writer waits to fill a batch
            (``0.002``).
        ``DURABLE_GROUP_COMMIT``
            Sync mode: concurrent requests' checkpoints are committed together
            by one writer thread, each request still waiting for its own
            commit (``False``).
        ``DURABLE_SQLITE_SYNCHRONOUS``
            ``PRAGMA synchronous`` for SQLite: ``"NORMAL"`` (default; WAL
            keeps the database consistent, a power loss may lose the last
            commits) or ``"FULL"``.
        ``DURABLE_SQLITE_BUSY_TIMEOUT``
            Seconds a SQLite writer waits for the lock before the request
            fails with ``503`` (``30``).
        ``DURABLE_EVENT_KEY``
            Bearer key of ``POST <prefix>/events``; the route answers 404
            without one.
        ``DURABLE_SECRET_KEY``
            Key signing wait tokens; default ``SECRET_KEY``, else a random
            key kept in the database.
        ``DURABLE_IDEMPOTENCY_TTL``
            Seconds an ``Idempotency-Key`` is remembered (``86400``).
        ``DURABLE_MAX_STEPS``
            Steps per run at most (``1000``).
        ``DURABLE_MAX_STEP_OUTPUT``
            Bytes of one step's stored output at most (4 MiB).
        ``DURABLE_MAX_RUN_STATE``
            Bytes of all of a run's stored outputs at most (32 MiB).
        ``DURABLE_MAX_REQUEST_BODY``
            Bytes of a request body at most (1 MiB); larger is ``413``.

        :raises RuntimeError: if ``app`` already has flask-durable.
        """
        if "durable" in app.extensions:
            raise RuntimeError(
                "flask-durable is already set up on this app; call init_app once"
            )
        for key, value in _DEFAULTS.items():
            app.config.setdefault(key, value)
        state = _State(app)
        app.extensions["durable"] = state
        app.wsgi_app = CaptureMiddleware(app.wsgi_app, state)  # type: ignore[method-assign]
        from .views import blueprint

        app.register_blueprint(blueprint, url_prefix=state.url_prefix)
        app.before_request(state.ensure_ready_quietly)
        from .cli import durable_cli

        if not any(cmd is durable_cli for cmd in app.cli.commands.values()):
            app.cli.add_command(durable_cli)

    # -- the decorator ----------------------------------------------------------

    @overload
    def endpoint(self, view: F) -> F: ...

    @overload
    def endpoint(
        self,
        view: None = None,
        *,
        retries: int | None = None,
        id: str | None = None,
        timeout: Duration | None = None,
        checkpoint: str | None = None,
    ) -> Callable[[F], F]: ...

    def endpoint(
        self,
        view: F | None = None,
        *,
        retries: int | None = None,
        id: str | None = None,
        timeout: Duration | None = None,
        checkpoint: str | None = None,
    ) -> F | Callable[[F], F]:
        """Make a view durable. Use bare or with options::

            @app.post("/book")
            @durable.endpoint(retries=10, id="book", timeout="1h")
            def book(): ...

        :param retries: retries per step (default ``DURABLE_RETRIES``).
        :param id: stable name of the endpoint (default: the view's endpoint
            name); keep it when renaming the view.
        :param timeout: cancel the run if it has not finished after this
            long; waiters get ``504``.
        :param checkpoint: ``"sync"`` or ``"async"`` for this endpoint
            (default ``DURABLE_CHECKPOINT``).
        """
        if checkpoint not in (None, "sync", "async"):
            raise ValueError(
                f"checkpoint must be 'sync' or 'async', not {checkpoint!r}"
            )
        if retries is not None and (
            isinstance(retries, bool) or not isinstance(retries, int) or retries < 0
        ):
            raise ValueError(f"retries must be an integer >= 0, not {retries!r}")
        if id is not None and (not isinstance(id, str) or not id or len(id) > 255):
            raise ValueError(f"id must be a string of 1 to 255 characters, not {id!r}")
        options = EndpointOptions(
            retries=retries,
            id=id,
            timeout_seconds=None if timeout is None else parse_duration(timeout),
            checkpoint=checkpoint,
        )

        def decorator(view: F) -> F:
            @functools.wraps(view)
            def wrapper(*args: Any, **kwargs: Any) -> Any:
                return get_state().execute(view, options, args, kwargs)

            wrapper.durable_options = options  # type: ignore[attr-defined]
            return wrapper  # type: ignore[return-value]

        if view is not None:
            return decorator(view)
        return decorator

    # -- API -------------------------------------------------------------------

    def is_replay(self) -> bool:
        """Whether the current request is a replay of a durable run (usable
        in ``before_request`` hooks to skip one-time checks)."""
        return REPLAY_KEY in request.environ

    def send(self, name: str, data: Any = None, *, id: str | None = None) -> str:
        """Record an event and resume every run waiting for it.

        :param name: the event name (``"approval/received"``).
        :param data: JSON-serializable payload (default ``{}``).
        :param id: deduplicates: an event with the same id sent within 24
            hours is ignored.
        :returns: the event id.
        """
        return get_state().send(name, data, id)

    def cancel(self, run_id: str) -> bool:
        """Cancel a run: at once if it is suspended, at its next step
        boundary if it is executing. Waiters get ``409``.

        :returns: ``False`` if the run is unknown or already finished.
        """
        return get_state().cancel(run_id)

    def get_run(self, run_id: str) -> RunInfo | None:
        """A read-only view of a run, or ``None`` if unknown.

        Checkpoints this process still has queued (``"async"`` mode) are
        committed first, so a run just answered here is seen whole.
        """
        state = get_state()
        state.ensure_schema()
        state.writer.flush()  # what this process has queued, too
        row = state.store.get_run(run_id)
        if row is None:
            return None
        steps = [
            StepInfo(
                id=r["step_id"],
                status=r["status"],
                attempts=r["attempts"],
                output=load_value(r["output"]) if r["output"] is not None else None,
                error=_error_dict(r["error"]),
                started_at=to_datetime(r["started_at"]),
                finished_at=to_datetime(r["finished_at"]),
                due_at=to_datetime(r["due_at"]),
            )
            for r in state.store.load_steps(run_id)
        ]
        response = None
        if row.response is not None:
            status, headers, body = decode_response(row.response)
            response = (int(status.split(" ", 1)[0]), headers, body)
        return RunInfo(
            id=row.id,
            endpoint=row.endpoint,
            status=row.status,
            attempt=row.attempt,
            steps=steps,
            created_at=to_datetime(row.created_at),
            finished_at=to_datetime(row.finished_at),
            due_at=to_datetime(row.due_at),
            error=row.error,
            response=response,
        )

    def start(self) -> None:
        """Start the scheduler in this process now (for example from a
        gunicorn ``post_fork`` hook) instead of on the first request."""
        get_state().ensure_ready(scheduler=True)

    def shutdown(self) -> None:
        """Stop the scheduler of the current app and close its database
        connections (tests, graceful shutdown)."""
        get_state().close()


def _error_dict(text: str | None) -> dict[str, str] | None:
    if not text:
        return None
    error_type, message = load_json(text)
    return {"type": error_type, "message": message}
