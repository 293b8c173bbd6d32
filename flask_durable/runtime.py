"""The per-app engine: starting, suspending, finishing and resuming runs.

Every state change of a run goes through a method of :class:`_State`
(``start``, ``suspend``, ``finish``, ``finish_detached``, ``resume``,
``cancel``), which is where signals are sent and waiters are woken.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import secrets
import socket
import threading
import time
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from flask import Response, current_app, jsonify, request, url_for
from itsdangerous import BadSignature, Signer
from werkzeug.exceptions import RequestEntityTooLarge

from . import signals
from .context import RunContext, StepRecord, _cv_run
from .errors import _Cancelled, _LeaseLost, _StoreUnavailable, _Suspend
from .replay import CONTEXT_KEY, REPLAY_KEY, capture_request, encode_response, replay
from .scheduler import Scheduler
from .serde import dump_json, dump_value
from .store import TERMINAL_STATUSES, UNAVAILABLE, LeaseLost, Store
from .writer import CheckpointWriter

if TYPE_CHECKING:
    from flask import Flask

    from .extension import EndpointOptions

log = logging.getLogger("flask_durable")

_STATES: weakref.WeakSet[_State] = weakref.WeakSet()
_IDEMPOTENCY_HEADER = "Idempotency-Key"


def _new_run_id() -> str:
    """32 hex characters, ordered by creation time (ms) then random."""
    return f"{int(time.time() * 1000):012x}{os.urandom(10).hex()}"


def json_response(
    code: int, header_run_id: str | None = None, /, **body: Any
) -> Response:
    """A small JSON response that does not need an app context; with
    ``header_run_id`` it carries the ``Durable-Run-Id`` header."""
    response = Response(
        json.dumps(body, separators=(",", ":")),
        status=code,
        mimetype="application/json",
    )
    if header_run_id is not None:
        response.headers["Durable-Run-Id"] = header_run_id
    return response


def unavailable(error: Exception, run_id: str | None = None) -> Response:
    """``503`` for a database that cannot be reached right now."""
    log.warning("flask-durable database unavailable: %s", error)
    response = json_response(
        503,
        run_id,
        error="the durable store is unavailable; retry shortly",
        **({"run_id": run_id} if run_id else {}),
    )
    response.headers["Retry-After"] = "2"
    return response


def prefers_async(header: str | None) -> bool:
    """Whether a ``Prefer`` header (RFC 7240) asks for ``respond-async``."""
    if not header:
        return False
    for part in header.split(","):
        if part.split(";", 1)[0].strip().lower() == "respond-async":
            return True
    return False


class _State:
    """What :class:`~flask_durable.Durable` keeps for one app, in
    ``app.extensions["durable"]``."""

    def __init__(self, app: Flask) -> None:
        config = app.config
        self.app = app
        uri = config["DURABLE_DATABASE_URI"]
        if uri is None:
            uri = "sqlite:///" + os.path.join(app.instance_path, "durable.sqlite3")
        self.store = Store(
            uri,
            config["DURABLE_ENGINE_OPTIONS"],
            config["DURABLE_SQLITE_SYNCHRONOUS"],
            _float(config, "DURABLE_SQLITE_BUSY_TIMEOUT", 0),
            _float(config, "DURABLE_LEASE_SECONDS", 0.1),
        )
        self.url_prefix: str = config["DURABLE_URL_PREFIX"]
        self.retries = _int(config, "DURABLE_RETRIES", 0)
        self.retry_backoff = _float(config, "DURABLE_RETRY_BACKOFF", 0)
        self.retry_backoff_max = _float(config, "DURABLE_RETRY_BACKOFF_MAX", 0)
        self.wait_timeout = _float(config, "DURABLE_WAIT_TIMEOUT", 0)
        self.poll_interval = _float(config, "DURABLE_POLL_INTERVAL", 0.01)
        self.lease_seconds = _float(config, "DURABLE_LEASE_SECONDS", 0.1)
        self.scheduler_enabled = bool(config["DURABLE_SCHEDULER"])
        self.checkpoint_mode = str(config["DURABLE_CHECKPOINT"])
        if self.checkpoint_mode not in ("sync", "async"):
            raise ValueError("DURABLE_CHECKPOINT must be 'sync' or 'async'")
        self.event_key: str | None = config["DURABLE_EVENT_KEY"]
        self.idempotency_ttl = _float(config, "DURABLE_IDEMPOTENCY_TTL", 0)
        self.max_steps = _int(config, "DURABLE_MAX_STEPS", 1)
        self.max_step_output = _int(config, "DURABLE_MAX_STEP_OUTPUT", 1)
        self.max_run_state = _int(config, "DURABLE_MAX_RUN_STATE", 1)
        self.max_request_body = _int(config, "DURABLE_MAX_REQUEST_BODY", 0)
        self.max_parallel = _int(config, "DURABLE_MAX_PARALLEL", 1)
        self.workers = _int(config, "DURABLE_WORKERS", 1)
        self.writer = CheckpointWriter(
            self.store,
            _int(config, "DURABLE_CHECKPOINT_BATCH", 1),
            _float(config, "DURABLE_CHECKPOINT_INTERVAL", 0),
        )
        self.group_commit = bool(config["DURABLE_GROUP_COMMIT"])
        self._secret = config["DURABLE_SECRET_KEY"] or app.secret_key
        self._signer: Signer | None = None
        self.active: dict[str, RunContext] = {}
        self.waiters = _Waiters()
        self.scheduler = Scheduler(self)
        self._lock = threading.Lock()
        self._ready_pid: int | None = None
        self._schema_pid: int | None = None
        self._counter = itertools.count()
        self._owner_prefix = ""
        self.closed = False
        self._listener: threading.Thread | None = None
        self._listener_stop = threading.Event()
        _STATES.add(self)

    # -- lifecycle ---------------------------------------------------------------

    def ensure_schema(self) -> None:
        """Create the tables once per process, without starting threads
        (what ``send``, ``cancel`` and ``get_run`` need in a shell or a
        one-off script)."""
        if self._schema_pid == os.getpid():
            return
        with self._lock:
            pid = os.getpid()
            if self.closed:
                raise RuntimeError("flask-durable was shut down for this app")
            if self._schema_pid != pid:
                host = socket.gethostname()[:20]
                self._owner_prefix = f"{host}:{pid}:{secrets.token_hex(3)}"
                self.store.create_all()
                self._schema_pid = pid

    def ensure_ready(self, *, scheduler: bool | None = None) -> None:
        """Create the tables and start the scheduler (and the PostgreSQL
        listener), once per process."""
        if self._ready_pid == os.getpid() and not scheduler:
            return
        self.ensure_schema()
        with self._lock:
            pid = os.getpid()
            if self._ready_pid != pid:
                # Without the scheduler, the heartbeat still keeps the
                # leases of the runs this process's requests execute.
                self.scheduler.start(
                    full=self.scheduler_enabled and scheduler is not False
                )
                if self.store.is_postgres:
                    self._start_listener()
                self._ready_pid = pid
            if scheduler and not self.scheduler.running:
                self.scheduler.shutdown()
                self.scheduler.start()

    def ensure_ready_quietly(self) -> None:
        """``before_request`` hook: start the scheduler on the first request
        of a process, without failing requests that do not use it."""
        if self._ready_pid == os.getpid():
            return
        try:
            self.ensure_ready()
        except UNAVAILABLE as e:
            log.warning("flask-durable could not start yet: %s", e)

    def _start_listener(self) -> None:
        """Listen for runs finished or woken by other processes."""
        self._listener_stop = threading.Event()
        self._listener = threading.Thread(
            target=self.store.listen,
            args=(self._on_notify, self._listener_stop),
            name="durable-listener",
            daemon=True,
        )
        self._listener.start()

    def _on_notify(self, channel: str, run_id: str) -> None:
        if channel == self.store.FINISHED_CHANNEL:
            self.waiters.notify(run_id)
        elif channel == self.store.WAKE_CHANNEL:
            self.scheduler.wake_now(run_id)

    def after_fork(self) -> None:
        """In a forked child: threads and connections of the parent are
        gone; start afresh on first use."""
        self._lock = threading.Lock()
        self._ready_pid = None
        self._schema_pid = None
        self.active.clear()
        self._listener = None
        self.waiters = _Waiters()
        self.scheduler = Scheduler(self)
        self.writer = CheckpointWriter(
            self.store, self.writer.batch, self.writer.interval
        )
        self.store.dispose(close=False)

    def close(self) -> None:
        """Stop the scheduler and close the database connections."""
        self.closed = True
        self.writer.stop()
        if self._ready_pid == os.getpid():
            self.scheduler.shutdown()
            if self._listener is not None:
                self._listener_stop.set()
                self._listener.join(5)
                self._listener = None
        self._ready_pid = None
        self.store.dispose()

    def new_owner(self) -> str:
        return f"{self._owner_prefix}:{next(self._counter)}"

    # -- tokens ------------------------------------------------------------------

    @property
    def signer(self) -> Signer:
        if self._signer is None:
            secret = self._secret or self.store.secret()
            self._signer = Signer(secret, salt="flask-durable.wait")
        return self._signer

    def sign(self, run_id: str) -> str:
        return self.signer.sign(run_id).decode("ascii")

    def unsign(self, token: str) -> str | None:
        try:
            return self.signer.unsign(token).decode("ascii")
        except (BadSignature, UnicodeError):
            return None

    def wait_url(self, run_id: str) -> str:
        return url_for("durable.wait", token=self.sign(run_id))

    # -- executing a view --------------------------------------------------------

    def execute(
        self, view: Callable[..., Any], options: EndpointOptions, args: Any, kwargs: Any
    ) -> Any:
        """Run a durable view for a new request or a replay."""
        try:
            self.ensure_ready()
        except UNAVAILABLE as e:
            return unavailable(e)
        environ = request.environ
        claim = environ.get(REPLAY_KEY)
        if claim is None:
            try:
                started = self._start(options)
            except UNAVAILABLE as e:
                return unavailable(e)
            if isinstance(started, Response):
                return started
            ctx = started
        else:
            try:
                records = [StepRecord(**r) for r in self.store.load_steps(claim["id"])]
            except UNAVAILABLE as e:
                # Still leased: resumed again once the lease expires.
                return unavailable(e, claim["id"])
            ctx = RunContext(
                self,
                run_id=claim["id"],
                endpoint=claim["endpoint"],
                owner=claim["owner"],
                version=claim["version"],
                attempt=claim["attempt"],
                retries=self._retries(options),
                deadline=claim["deadline"],
                records=records,
                new_run=None,
                async_checkpoints=self._async(options),
            )
            ctx.lease_renewed(claim["claimed_at"])
        environ[CONTEXT_KEY] = ctx
        if claim is not None:
            # The environ is copied on its way in; the claim dict is shared.
            claim["context"] = ctx
        self.active[ctx.id] = ctx
        token = _cv_run.set(ctx)
        try:
            rv = view(*args, **kwargs)
        except _Suspend as s:
            return self.suspend(ctx, s)
        except _Cancelled as c:
            ctx.outcome = "cancelled"
            return self.cancelled_response(ctx.id, c.reason)
        except _LeaseLost:
            self._drop(ctx)
            # Another process took the run over: its client follows it there.
            return self.async_response(ctx.id, "running")
        except _StoreUnavailable as e:
            # Our database is unreachable: nothing is lost (what was committed
            # stays, a stored run is resumed once its lease expires); tell the
            # client to come back.
            self._drop(ctx)
            return unavailable(e.error, ctx.id)
        except BaseException as e:
            ctx.outcome = "failed"
            ctx.error = f"{type(e).__name__}: {e}"
            raise
        finally:
            _cv_run.reset(token)
        ctx.outcome = "completed"
        return rv

    def _drop(self, ctx: RunContext) -> None:
        """This execution ends without a final response: forget it here
        (what it committed stays; another execution continues the run)."""
        ctx.outcome = "lost"
        self.active.pop(ctx.id, None)

    def _async(self, options: EndpointOptions) -> bool:
        mode = options.checkpoint or self.checkpoint_mode
        return mode == "async"

    def _retries(self, options: EndpointOptions) -> int:
        return self.retries if options.retries is None else options.retries

    def _start(self, options: EndpointOptions) -> RunContext | Response:
        """Record a new run for the current request, or answer it at once
        (body too large, idempotent repeat)."""
        limit = self.max_request_body
        environ = request.environ
        try:
            if environ.get("CONTENT_LENGTH", "0") in ("", "0") and not (
                environ.get("HTTP_TRANSFER_ENCODING")
                or environ.get("wsgi.input_terminated")
            ):
                body = b""  # nothing to read (most GETs)
            else:
                if (
                    request.max_content_length is None
                    or request.max_content_length > limit
                ):
                    request.max_content_length = limit
                body = request.get_data(cache=True)
        except RequestEntityTooLarge:
            return json_response(
                413,
                error="request body too large",
                limit=limit,
                detail=f"durable endpoints accept bodies up to {limit} bytes"
                " (DURABLE_MAX_REQUEST_BODY)",
            )
        endpoint = options.id or request.endpoint or "unknown"
        now = time.time()
        run_id = _new_run_id()
        owner = self.new_owner()
        timeout = options.timeout_seconds
        row: dict[str, Any] = {
            "id": run_id,
            "endpoint": endpoint,
            "status": "running",
            "attempt": 0,
            "version": 0,
            "created_at": now,
            "updated_at": now,
            "due_at": now,
            "deadline": None if timeout is None else now + timeout,
            "lease_owner": owner,
            "lease_expires_at": now + self.lease_seconds,
            "cancel_requested": False,
            "idempotency_key": None,
            "request_hash": None,
            "idempotency_expires_at": None,
            "request": capture_request(environ, body),
        }
        key = request.headers.get(_IDEMPOTENCY_HEADER)
        new_run: dict[str, Any] | None = row
        if key is not None:
            if not key or len(key) > 255 or not key.isprintable():
                return json_response(
                    400, error="bad Idempotency-Key: 1 to 255 printable characters"
                )
            digest = hashlib.sha256()
            for part in (
                request.method,
                request.path,
                request.query_string.decode("latin-1"),
            ):
                digest.update(part.encode("utf-8", "surrogateescape") + b"\0")
            digest.update(body)
            row.update(
                idempotency_key=key,
                request_hash=digest.hexdigest(),
                idempotency_expires_at=now + self.idempotency_ttl,
            )
            repeat = self._idempotent_repeat(endpoint, key, row["request_hash"], now)
            if repeat is not None:
                return repeat
            if not self.store.try_insert_idempotent_run(row):
                repeat = self._idempotent_repeat(
                    endpoint, key, row["request_hash"], now
                )
                if repeat is not None:
                    return repeat
                return json_response(409, error="Idempotency-Key is in use; retry")
            new_run = None
        ctx = RunContext(
            self,
            run_id=run_id,
            endpoint=endpoint,
            owner=owner,
            version=0,
            attempt=0,
            retries=self._retries(options),
            deadline=row["deadline"],
            records=[],
            new_run=new_run,
            async_checkpoints=self._async(options),
        )
        if signals.run_started.receivers:
            signals.run_started.send(self.app, run_id=run_id, endpoint=endpoint)
        return ctx

    def _idempotent_repeat(
        self, endpoint: str, key: str, request_hash: str, now: float
    ) -> Response | None:
        found = self.store.find_idempotent(endpoint, key)
        if found is None or (found.idempotency_expires_at or 0) < now:
            return None
        if found.request_hash != request_hash:
            return json_response(
                422,
                found.id,
                error="Idempotency-Key was used with a different request",
                run_id=found.id,
            )
        if found.status in TERMINAL_STATUSES and found.response is not None:
            return stored_response(found.response)
        return self.async_response(found.id, found.status)

    # -- state changes -----------------------------------------------------------

    def suspend(self, ctx: RunContext, signal: _Suspend) -> Response:
        """Park a run until ``signal.due_at`` and answer with the wait URL."""
        due = signal.due_at
        if ctx.deadline is not None:
            due = min(due, ctx.deadline)
        inserts, updates, new_waits = ctx.take_pending()
        try:
            if ctx.async_checkpoints:
                self.writer.flush()
            due = self.store.suspend(
                ctx.id,
                ctx.owner,
                ctx.version,
                signal.status,
                due,
                inserts,
                updates,
                new_waits,
                new_run=ctx.new_run,
            )
        except LeaseLost:
            self._drop(ctx)
            # Another process took the run over: its client follows it there.
            return self.async_response(ctx.id, "running")
        except UNAVAILABLE as e:
            self._drop(ctx)
            return unavailable(e, ctx.id)
        except BaseException:
            self._drop(ctx)
            raise
        ctx.new_run = None
        ctx.in_db = True
        ctx.outcome = "suspended"
        self.active.pop(ctx.id, None)
        if signals.run_suspended.receivers:
            signals.run_suspended.send(
                self.app, run_id=ctx.id, status=signal.status, due_at=due
            )
        self.scheduler.wake_at(ctx.id, due)
        for wait in new_waits:
            self.catch_up(ctx.id, wait)
        return self.async_response(ctx.id, signal.status)

    def async_response(self, run_id: str, status: str) -> Response:
        """``303`` (or ``202`` for ``Prefer: respond-async``) to the wait URL."""
        url = self.wait_url(run_id)
        response = jsonify(run_id=run_id, status=status, wait_url=url)
        response.headers["Location"] = url
        response.headers["Durable-Run-Id"] = run_id
        if prefers_async(request.headers.get("Prefer")):
            response.status_code = 202
            response.headers["Preference-Applied"] = "respond-async"
        else:
            response.status_code = 303
        return response

    @staticmethod
    def cancelled_response(run_id: str, reason: str) -> Response:
        if reason == "timeout":
            return json_response(
                504, run_id, error="run timed out", run_id=run_id, status="cancelled"
            )
        return json_response(
            409, run_id, error="run was cancelled", run_id=run_id, status="cancelled"
        )

    def finish(self, ctx: RunContext, response: bytes) -> None:
        """Store a run's final response (called by the capture middleware)."""
        status = ctx.outcome or "failed"
        inserts, updates, _ = ctx.take_pending()
        item: dict[str, Any] = {
            "kind": "finish",
            "run_id": ctx.id,
            "owner": ctx.owner,
            "status": status,
            "response": response,
            "error": ctx.error,
            "new_run": ctx.new_run,
            "inserts": inserts,
            "updates": updates,
            "waits_possible": ctx.is_replay or ctx.waited,
            "notify": ctx.preexisting,
        }
        ctx.finishing = True
        if ctx.async_checkpoints:
            item["after"] = lambda: self._finished_async(ctx, status)
            self.writer.submit(ctx, item)
            ctx.new_run = None
            return
        try:
            if self.group_commit:
                committed = self.writer.commit(ctx, item)
            else:
                committed = self.writer.write_now(item)
            if not committed:
                log.warning("run %s: lease lost before its response was stored", ctx.id)
                return
        except UNAVAILABLE as e:
            # The client still gets the response; the run keeps its lease
            # and is replayed (steps memoized) to store it once it expires.
            log.warning("run %s: final response not stored: %s", ctx.id, e)
            return
        finally:
            self.active.pop(ctx.id, None)
        ctx.new_run = None
        self._finished(ctx.id, ctx.endpoint, status)

    def _finished_async(self, ctx: RunContext, status: str) -> None:
        self.active.pop(ctx.id, None)
        self._finished(ctx.id, ctx.endpoint, status)

    def finish_detached(
        self, claim: dict[str, Any], status: str, response: bytes
    ) -> None:
        """Finish a claimed run without executing its view."""
        try:
            self.store.finish(claim["id"], claim["owner"], status, response, None)
        except LeaseLost:
            return
        self._finished(claim["id"], claim["endpoint"], status)

    def _finished(self, run_id: str, endpoint: str, status: str) -> None:
        self.waiters.notify(run_id)
        self.scheduler.notify_finished(run_id)
        signal = signals.run_completed if status == "completed" else signals.run_failed
        if signal.receivers:
            signal.send(self.app, run_id=run_id, endpoint=endpoint, status=status)

    def resume(self, claim: dict[str, Any]) -> None:
        """Execute a claimed run: finish it if it was cancelled or timed
        out, else replay it through the app."""
        deadline = claim["deadline"]
        if claim["cancel_requested"] or (
            deadline is not None and time.time() >= deadline
        ):
            reason = "cancelled" if claim["cancel_requested"] else "timeout"
            response = self.cancelled_response(claim["id"], reason)
            self.finish_detached(
                claim,
                "cancelled",
                encode_response(
                    response.status, list(response.headers.items()), response.get_data()
                ),
            )
            return
        replay(self, claim)

    def cancel(self, run_id: str) -> bool:
        """See :meth:`flask_durable.Durable.cancel`."""
        self.ensure_schema()
        ctx = self.active.get(run_id)
        if ctx is not None:
            ctx.request_cancel()
        flagged = self.store.request_cancel(run_id)
        if not flagged:
            return ctx is not None
        owner = self.new_owner()
        row = self.store.claim(run_id, owner, self.lease_seconds, force=True)
        if row is not None:
            self.resume(claim_dict(row, owner))
        return True

    # -- events --------------------------------------------------------------------

    def send(self, name: str, data: Any = None, event_id: str | None = None) -> str:
        """See :meth:`flask_durable.Durable.send`."""
        self.ensure_schema()
        if not isinstance(name, str) or not name or len(name) > 255:
            raise ValueError("an event name must be a string of 1 to 255 characters")
        if event_id is None:
            event_id = secrets.token_hex(16)
        elif not isinstance(event_id, str) or not event_id or len(event_id) > 128:
            raise ValueError("an event id must be a string of 1 to 128 characters")
        if data is None:
            data = {}
        try:
            data_text = dump_json(data)
        except (TypeError, ValueError) as e:
            raise TypeError(f"event data must be JSON-serializable: {e}") from None
        ts = time.time()
        if not self.store.insert_event(event_id, name, data_text, ts, 86400.0):
            return event_id
        event = {"name": name, "data": data, "id": event_id, "ts": int(ts * 1000)}
        for wait in self.store.waits_for(name, ts):
            if matches(json.loads(wait.match), event):
                self._deliver(wait.run_id, wait.step_id, event)
        return event_id

    def _deliver(self, run_id: str, step_id: str, event: dict[str, Any]) -> None:
        if self.store.deliver(run_id, step_id, dump_value(event)):
            self.scheduler.wake_now(run_id)

    def catch_up(self, run_id: str, wait: dict[str, Any]) -> None:
        """Deliver an event that arrived while the wait was being stored."""
        match = json.loads(wait["match"])
        for row in self.store.events_since(
            wait["event"], wait["since"], time.time() + 1
        ):
            event = {
                "name": row.name,
                "data": json.loads(row.data),
                "id": row.id,
                "ts": int(row.ts * 1000),
            }
            if matches(match, event):
                self._deliver(run_id, wait["step_id"], event)
                return


def claim_dict(row: Any, owner: str) -> dict[str, Any]:
    """The claim of a run as passed to replays (and kept in the environ)."""
    return {
        "id": row.id,
        "owner": owner,
        "version": row.version,
        "attempt": row.attempt,
        "deadline": row.deadline,
        "cancel_requested": bool(row.cancel_requested),
        "endpoint": row.endpoint,
        "request": row.request,
        # When the lease was taken, by this process's clock (a little late:
        # after the claim's round trip, well inside the lease's margin).
        "claimed_at": time.monotonic(),
    }


_MISSING = object()


def matches(match: dict[str, Any], event: dict[str, Any]) -> bool:
    """Whether every dotted path of ``match`` equals the event's field."""
    for path, expected in match.items():
        value: Any = event
        for part in path.split("."):
            if isinstance(value, dict):
                value = value.get(part, _MISSING)
            elif isinstance(value, list) and part.isdigit() and int(part) < len(value):
                value = value[int(part)]
            else:
                value = _MISSING
            if value is _MISSING:
                return False
        if value != expected or isinstance(value, bool) != isinstance(expected, bool):
            return False
    return True


def stored_response(blob: bytes) -> Response:
    """A stored final response, status, headers and body as they were."""
    from .replay import decode_response

    status, headers, body = decode_response(blob)
    response = Response(body, status=status, headers=headers)
    return response


class _Waiters:
    """Wakes wait-URL requests in this process when a run finishes."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._events: dict[str, list[threading.Event]] = {}

    def subscribe(self, run_id: str) -> threading.Event:
        event = threading.Event()
        with self._lock:
            self._events.setdefault(run_id, []).append(event)
        return event

    def unsubscribe(self, run_id: str, event: threading.Event) -> None:
        with self._lock:
            listeners = self._events.get(run_id)
            if listeners is not None:
                listeners.remove(event)
                if not listeners:
                    del self._events[run_id]

    def notify(self, run_id: str) -> None:
        with self._lock:
            listeners = list(self._events.get(run_id, ()))
        for event in listeners:
            event.set()


def _int(config: Any, key: str, minimum: int) -> int:
    value = config[key]
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{key} must be an integer >= {minimum}, not {value!r}")
    return value


def _float(config: Any, key: str, minimum: float) -> float:
    value = config[key]
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or value < minimum
    ):
        raise ValueError(f"{key} must be a number >= {minimum}, not {value!r}")
    return float(value)


def _after_fork_in_child() -> None:
    for state in list(_STATES):
        state.after_fork()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def get_state() -> _State:
    """The state of the current app, or a clear error."""
    try:
        return current_app.extensions["durable"]
    except KeyError:
        raise RuntimeError(
            "flask-durable is not set up on this app: call durable.init_app(app)"
        ) from None
