"""The run state machine of one app: the one place a run changes state.

A run is *started* by a request (:meth:`Lifecycle.execute`), *suspended*
when a step must wait (:meth:`Lifecycle.suspend`), *finished* with its final
response (:meth:`Lifecycle.finish`, :meth:`Lifecycle.finish_detached`),
*resumed* by the scheduler (:meth:`Lifecycle.resume`), *rescheduled* when no
handler here can run it, *cancelled* (:meth:`Lifecycle.cancel`), *retried*
(:meth:`Lifecycle.retry`) and *rewound* (:meth:`Lifecycle.rewind`). Each of
these methods writes through the store or the run's committer, then, once
the write is committed, sends the signal and wakes the waiters that announce
it. ``docs/internals.rst`` draws the states.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import hmac
import itertools
import json
import logging
import math
import os
import secrets
import socket
import threading
import weakref
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from typing import Any

from flask import (
    Flask,
    Response,
    current_app,
    has_request_context,
    jsonify,
    request,
    url_for,
)
from sqlalchemy.exc import IntegrityError

from . import clock, signals
from .access import AccessRule
from .commit import (
    BatchedCommitter,
    Committer,
    DirectCommitter,
    GroupCommitter,
    WriterThread,
)
from .config import Config, EndpointOptions
from .context import _cv_run
from .crypto import STEP_CONTEXT, Cipher, DecryptionError, is_sealed_text
from .durations import to_datetime
from .errors import _Cancelled, _LeaseLost, _StoreUnavailable, _Suspend
from .events import Event, EventBus
from .execution import (
    Execution,
    StepHooks,
    StepObserver,
    ViewCaller,
    swallowed_error,
)
from .flow import FlowControl
from .functions import (
    CANCEL_PREFIX,
    FINISHED_EVENT,
    FUNCTION_PATH,
    INVOKED_EVENT,
    CronClock,
    DurableFunction,
    cron_key,
    function_request,
    tick_event,
)
from .records import (
    TERMINAL_STATUSES,
    Backlog,
    Claim,
    Finish,
    NewRun,
    RunInfo,
    RunStatus,
    RunSummary,
    StepInfo,
    Suspension,
    WaitSpec,
)
from .replay import (
    CONTEXT_KEY,
    REPLAY_KEY,
    StoragePolicy,
    build_environ,
    capture_request,
    describe_request,
    open_blob,
    read_body,
    replay,
    seal_blob,
)
from .responses import (
    cancelled,
    decode_response,
    encode_flask_response,
    encode_response,
    go_wait,
    json_response,
    stored_response,
    unavailable,
)
from .scheduler import Scheduler
from .serde import decode_envelope, dump_json, safe_text
from .store import (
    FINISHED_CHANNEL,
    STREAM_CHANNEL,
    UNAVAILABLE,
    WAKE_CHANNEL,
    open_store,
)
from .streams import Publisher, read_stream
from .tokens import WaitTokens
from .waiters import Waiters

log = logging.getLogger("flask_durable")

_LIFECYCLES: weakref.WeakSet[Lifecycle] = weakref.WeakSet()
_IDEMPOTENCY_ENVIRON = "HTTP_IDEMPOTENCY_KEY"
#: The request headers an Idempotency-Key is scoped to, when present.
_CALLER_HEADERS = ("Authorization", "Cookie")
#: Between a caller's fingerprint and its key in ``idempotency_key`` (keys
#: are printable, so a caller's keys never meet the anonymous ones).
_SCOPE_SEPARATOR = "\x1f"
#: Attribute of a durable view function holding its EndpointOptions.
OPTIONS_ATTR = "__durable_endpoint__"
#: How long a run waits before a process that has no handler for it (a
#: rolling deploy, a renamed route) gives it back to be tried again.
_UNHANDLED_DELAY = 30.0
#: The most runs :meth:`Lifecycle.list_runs` answers at once.
_MAX_LIST_LIMIT = 1000


def _new_run_id() -> str:
    """32 hex characters, ordered by creation time (ms) then random."""
    return f"{int(clock.now() * 1000):012x}{os.urandom(10).hex()}"


class _Ticket:
    """What a replay carries in its environ: the claim, and whether the
    request reached a durable view."""

    __slots__ = ("claim", "reached")

    def __init__(self, claim: Claim) -> None:
        self.claim = claim
        self.reached = False


class Lifecycle:
    """What :class:`~flask_durable.Durable` keeps for one app, in
    ``app.extensions["durable"]``."""

    def __init__(self, app: Flask, config: Config) -> None:
        self.app = app
        self.config = config
        self.store = open_store(config)
        fallbacks = list(config.secret_key_fallbacks)
        if config.secret_key is None:  # Flask's own old keys go with SECRET_KEY
            fallbacks[:0] = app.config.get("SECRET_KEY_FALLBACKS") or []
        self.tokens = WaitTokens(
            config.secret_key or app.secret_key,
            self.store.secret,
            fallbacks,
            config.wait_token_ttl,
        )
        #: Encrypts credentials (and payloads) at rest; no work until used.
        self.cipher = Cipher(
            config.secret_key or app.secret_key, fallbacks, self.store.secret
        )
        self.storage = StoragePolicy(
            self.cipher,
            config.sensitive_headers,
            config.replay_headers,
            config.encrypt_payloads,
        )
        #: Wait requests that may long-poll at once in this process.
        self.held_waits = threading.BoundedSemaphore(config.max_held_waits)
        self.active: dict[str, Execution] = {}
        #: Told of every step attempt, and calling each durable view in a
        #: span: set by :func:`flask_durable.observability.instrument` when
        #: ``DURABLE_METRICS`` or ``DURABLE_OTEL`` is on.
        self.observer: StepObserver | None = None
        #: Test hooks, set by :class:`flask_durable.testing.DurableTester`.
        self.hooks: StepHooks | None = None
        #: Set by :class:`flask_durable.testing.DurableTester`: settles a
        #: run asked for at its wait URL, in the calling thread.
        self.settle: Callable[[str], None] | None = None
        self.call_view: ViewCaller | None = None
        #: Who may use the dashboard (the :class:`~flask_durable.Durable`
        #: instance sets its own).
        self.access = AccessRule()
        #: The durable functions registered on this app, by id.
        self.functions: dict[str, DurableFunction] = {}
        self._flow_limits: tuple[
            int, dict[str, tuple[int | None, tuple[float, int] | None]]
        ] = (-1, {})
        #: Function runs executing here that a ``step.invoke`` started.
        self._invoked: set[str] = set()
        self.waiters = Waiters()
        #: Stream readers of this process, woken when a run publishes.
        self.streams = Waiters()
        # A delivered event is a step's output: the smaller limit holds.
        max_event, key = min(
            (config.max_event_size, "DURABLE_MAX_EVENT_SIZE"),
            (config.max_step_output, "DURABLE_MAX_STEP_OUTPUT"),
        )
        self.events = EventBus(
            self.store,
            self._wake,
            max_event,
            key,
            self.cipher,
            config.encrypt_payloads,
            self._cancel_on_event,
        )
        self._lock = threading.Lock()
        self._idempotency_keys: tuple[bytes, ...] | None = None
        self._counter = itertools.count()
        self._owner_prefix = ""
        self._ready_pid: int | None = None
        self._schema_pid: int | None = None
        self._endpoints: tuple[int, tuple[str, ...]] = (-1, ())
        self.closed = False
        self._new_process()
        _LIFECYCLES.add(self)

    def _new_process(self) -> None:
        """Threads and committers of this process."""
        config = self.config
        self.writer = WriterThread(
            self.store, config.checkpoint_batch, config.checkpoint_interval
        )
        self._committers: dict[str, Committer] = {
            "sync": GroupCommitter(self.writer)
            if config.group_commit
            else DirectCommitter(self.store),
            "async": BatchedCommitter(self.writer),
        }
        self.scheduler = Scheduler(
            config,
            self.store,
            self.active,
            self.resume,
            self.new_owner,
            self.endpoints,
        )
        self.scheduler.admit = self._admit
        self.scheduler.chores.append(self._repair_chore)

    # -- the process ----------------------------------------------------------

    def ensure_schema(self) -> None:
        """Create (or migrate) the tables once per process, without starting
        threads (what ``send``, ``cancel`` and ``get_run`` need in a shell)."""
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
        listener), once per process.

        :param scheduler: ``True`` to run the full scheduler even if
            ``DURABLE_SCHEDULER`` is off (``flask durable worker``).
        """
        if self._ready_pid == os.getpid() and not scheduler:
            return
        self.ensure_schema()
        self.endpoints()  # duplicate endpoint ids fail here, loudly
        with self._lock:
            if self.closed:
                raise RuntimeError("flask-durable was shut down for this app")
            pid = os.getpid()
            if self._ready_pid != pid:
                # Without the scheduler, the heartbeat still keeps the leases
                # of the runs this process's requests execute.
                self.scheduler.start(
                    full=self.config.scheduler and scheduler is not False
                )
                self.store.start_threads(self._on_notify)
                self._ready_pid = pid
            if scheduler and not self.scheduler.running:
                self.scheduler.shutdown()
                self.scheduler.start()

    def detach_threads(self) -> None:
        """Create the tables and count this process as started, without
        any thread (:class:`~flask_durable.testing.DurableTester` runs the
        due work itself); a scheduler already running here is stopped."""
        self.ensure_schema()
        with self._lock:
            pid = os.getpid()
            if self._ready_pid == pid:
                self.scheduler.shutdown()
                self.store.stop_threads()
            self._ready_pid = pid

    def admit_due(self, most: int) -> list[Claim]:
        """Claim up to ``most`` runs under flow-control limits, as far as
        their limits allow."""
        return self._admit(most)

    def start_in_background(self) -> None:
        """First request of a process: start the scheduler from a thread of
        its own, so that no request waits for the database."""
        if self._ready_pid == os.getpid():
            return

        def start() -> None:
            try:
                self.ensure_ready()
            except UNAVAILABLE as e:
                log.warning("flask-durable could not start yet: %s", e)
            except Exception:
                if not self.closed:  # else: shut down meanwhile
                    log.exception("flask-durable could not start")

        threading.Thread(target=start, name="durable-start", daemon=True).start()

    def _on_notify(self, channel: str, run_id: str) -> None:
        if channel == FINISHED_CHANNEL:
            self.waiters.notify(run_id)
            self.streams.notify(run_id)
        elif channel == WAKE_CHANNEL:
            self.scheduler.wake_now(run_id)
        elif channel == STREAM_CHANNEL:
            self.streams.notify(run_id)

    def _wake(self, run_id: str) -> None:
        self.scheduler.wake_now(run_id)

    def after_fork(self) -> None:
        """In a forked child: the parent's threads and connections are
        gone; start afresh on first use."""
        self._lock = threading.Lock()
        self._ready_pid = None
        self._schema_pid = None
        self.active.clear()
        self.waiters = Waiters()
        self.store.forget_threads()
        self._new_process()
        self.store.dispose(close=False)

    def close(self) -> None:
        """Stop the scheduler and close the database connections."""
        with self._lock:
            self.closed = True
            started = self._ready_pid == os.getpid()
            self._ready_pid = None
        self.writer.stop()
        if started:
            self.scheduler.shutdown()
            self.store.stop_threads()
        self.store.dispose()

    def new_owner(self) -> str:
        """A lease owner name, unique to this process and claim."""
        return f"{self._owner_prefix}:{next(self._counter)}"

    def endpoints(self) -> tuple[str, ...]:
        """The ids of the durable endpoints registered on the app: the
        runs this process may claim.

        :raises ValueError: when two endpoints share one id.
        """
        views = self.app.view_functions
        size, found = self._endpoints
        if size == len(views):
            return found
        ids: dict[str, str] = {}
        for name, view in views.items():
            options = getattr(view, OPTIONS_ATTR, None)
            if not isinstance(options, EndpointOptions):
                continue
            endpoint_id = options.id or name
            if endpoint_id in ids and ids[endpoint_id] != name:
                raise ValueError(
                    f"durable endpoint id {endpoint_id!r} is used by both"
                    f" {ids[endpoint_id]!r} and {name!r}: give each its own id="
                )
            ids[endpoint_id] = name
        found = tuple(sorted(ids))
        self._endpoints = (len(views), found)
        return found

    # -- tokens --------------------------------------------------------------

    def wait_url(self, run_id: str) -> str:
        """The run's wait URL, bound to the credentials of the current
        request (``Authorization``, ``Cookie``) when it carries any."""
        headers = request.headers if has_request_context() else None
        return url_for("durable.wait", token=self.tokens.sign(run_id, headers))

    def go_wait(self, run_id: str, status: str) -> Response:
        """``303`` (or ``202``) to the run's wait URL."""
        return go_wait(
            run_id, status, self.wait_url(run_id), request.headers.get("Prefer")
        )

    # -- executing a view ------------------------------------------------------

    def execute(
        self,
        view: Callable[..., Any],
        options: EndpointOptions,
        args: Any,
        kwargs: Any,
    ) -> Any:
        """Run a durable view for a new request or a replay."""
        if self._ready_pid != os.getpid():
            try:
                self.ensure_ready()
            except UNAVAILABLE as e:
                return unavailable(e)
        environ = request.environ
        ticket: _Ticket | None = environ.get(REPLAY_KEY)
        if ticket is None:
            try:
                started = self._start(options)
                if not isinstance(started, Response) and _wants_stream():
                    return self._detach_to_stream(started)
            except UNAVAILABLE as e:
                return unavailable(e)
            if isinstance(started, Response):
                return started
            ex = started
        else:
            ticket.reached = True
            claim = ticket.claim
            try:
                records = self.store.load_steps(claim.id)
            except UNAVAILABLE as e:
                # Still leased: resumed again once the lease expires.
                return unavailable(e, claim.id)
            ex = self._execution(
                options,
                run_id=claim.id,
                endpoint=claim.endpoint,
                owner=claim.owner,
                version=claim.version,
                attempt=claim.attempt,
                deadline=claim.deadline,
                records=records,
                new_run=None,
            )
            ex.lease_renewed(claim.claimed_at)
            if signals.run_resumed.receivers:
                signals.run_resumed.send(
                    self.app,
                    run_id=ex.id,
                    endpoint=ex.endpoint,
                    attempt=ex.attempt,
                )
        environ[CONTEXT_KEY] = ex
        self.active[ex.id] = ex
        token = _cv_run.set(ex)
        try:
            if self.call_view is None:
                rv = view(*args, **kwargs)
            else:
                rv = self.call_view(ex, view, args, kwargs)
            if ex.interrupt is not None:
                raise swallowed_error(ex.interrupt)
        except _Suspend as s:
            return self.suspend(ex, s)
        except _Cancelled as c:
            ex.outcome = "cancelled"
            return cancelled(ex.id, c.reason)
        except _LeaseLost:
            self.forget(ex)
            # Another process took the run over: its client follows it there.
            return self.go_wait(ex.id, "running")
        except _StoreUnavailable as e:
            # The database is unreachable: what was committed stays, a stored
            # run is resumed once its lease expires; the client comes back.
            self.forget(ex)
            return unavailable(e.error, ex.id)
        except BaseException as e:
            ex.outcome = "failed"
            # Stored as text: a lone surrogate or NUL would make the write
            # fail, and the run be replayed without end.
            ex.error = safe_text(f"{type(e).__name__}: {e}")
            raise
        finally:
            _cv_run.reset(token)
        ex.outcome = "completed"
        return rv

    def _execution(self, options: EndpointOptions, **fields: Any) -> Execution:
        config = self.config
        mode = options.checkpoint or config.checkpoint
        return Execution(
            retries=config.retries if options.retries is None else options.retries,
            committer=self._committers[mode],
            config=config,
            renew=self.store.renew_one,
            sender=self.app,
            cipher=self.cipher,
            seal_outputs=config.encrypt_payloads,
            observer=self.observer,
            hooks=self.hooks,
            **fields,
        )

    def _start(self, options: EndpointOptions) -> Execution | Response:
        """A new run for the current request, or an answer at once (body
        too large, idempotent repeat)."""
        limit = self.config.max_request_body
        environ = request.environ
        body = read_body(request, limit)
        if body is None:
            return json_response(
                413,
                error="request body too large",
                limit=limit,
                detail=f"durable endpoints accept bodies up to {limit} bytes"
                " (DURABLE_MAX_REQUEST_BODY)",
            )
        endpoint = options.id or request.endpoint or "unknown"
        now = clock.now()
        run_id = _new_run_id()
        timeout = options.timeout_seconds
        run = NewRun(
            id=run_id,
            app_id=self.config.app_id,
            endpoint=endpoint,
            created_at=now,
            deadline=None if timeout is None else now + timeout,
            owner=self.new_owner(),
            request=capture_request(environ, body, self.storage),
        )
        flow = options.flow
        if flow is not None:
            limited = self._flow_intake(flow)
            if isinstance(limited, Response):
                return limited
            if limited is not None:
                run = dataclasses.replace(run, flow_key=limited)
        key = environ.get(_IDEMPOTENCY_ENVIRON)
        stored = False
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
            request_hash = digest.hexdigest()
            scoped = self._scoped_keys(key)
            run = dataclasses.replace(
                run,
                idempotency_key=scoped[0],
                request_hash=request_hash,
                idempotency_expires_at=now + self.config.idempotency_ttl,
            )
            repeat = self._idempotent_repeat(endpoint, scoped, request_hash, now)
            if repeat is not None:
                return repeat
            if run.flow_key is not None:
                assert flow is not None
                try:
                    if not self._enter(run, flow):
                        return self.go_wait(run_id, "queued")
                except IntegrityError:
                    repeat = self._idempotent_repeat(
                        endpoint, scoped, request_hash, now
                    )
                    if repeat is not None:
                        return repeat
                    return json_response(409, error="Idempotency-Key is in use; retry")
            elif not self.store.try_insert_idempotent_run(run):
                repeat = self._idempotent_repeat(endpoint, scoped, request_hash, now)
                if repeat is not None:
                    return repeat
                return json_response(409, error="Idempotency-Key is in use; retry")
            stored = True
        elif run.flow_key is not None:
            assert flow is not None
            if not self._enter(run, flow):
                return self.go_wait(run_id, "queued")
            stored = True
        ex = self._execution(
            options,
            run_id=run_id,
            endpoint=endpoint,
            owner=run.owner,
            version=0,
            attempt=0,
            deadline=run.deadline,
            records=[],
            new_run=None if stored else run,
        )
        ex.on_stored = lambda: self._started(run_id, endpoint)
        if stored:
            ex.run_stored()
        return ex

    def _flow_intake(self, flow: FlowControl) -> Response | str | None:
        """A rate limit's ``429``, or the run's flow key (``None`` when it
        has no concurrency or throttle limit)."""
        if flow.rate_limit is not None:
            wait = self.store.rate_limit(
                flow.rate_key_of(request), *flow.rate_limit.gcra
            )
            if wait:
                response = json_response(
                    429,
                    error="rate limit reached: retry later",
                    retry_after=round(wait, 3),
                )
                response.headers["Retry-After"] = str(max(1, math.ceil(wait)))
                return response
        return flow.flow_key(request) if flow.queues else None

    def _enter(self, run: NewRun, flow: FlowControl) -> bool:
        """Store a new run under its limits: ``True`` when it may execute
        now, ``False`` when it is queued (a worker starts it later)."""
        concurrency, throttle = flow.admission
        admitted = self.store.enter(run, concurrency, throttle)
        if not admitted:
            self._started(run.id, run.endpoint)
            self.scheduler.admit_soon()
        return admitted

    def flow_limits(self) -> dict[str, tuple[int | None, tuple[float, int] | None]]:
        """The admission limits of the endpoints and functions served here,
        by endpoint id."""
        views = self.app.view_functions
        size, found = self._flow_limits
        if size == len(views):
            return found
        limits = {}
        for name, view in views.items():
            options = getattr(view, OPTIONS_ATTR, None)
            if isinstance(options, EndpointOptions) and options.flow is not None:
                if options.flow.queues:
                    limits[options.id or name] = options.flow.admission
        self._flow_limits = (len(views), limits)
        return limits

    def flow_usage(self) -> list[dict[str, Any]]:
        """Each limit key with unfinished runs: ``key`` (the endpoint or
        function id, then the key's value), ``endpoint``, ``running``,
        ``queued`` (due and waiting for a slot) and ``limit``."""
        self.ensure_schema()
        limits = self.flow_limits()
        return [
            {
                "key": row.flow_key.replace("\x1f", " / "),
                "endpoint": row.endpoint,
                "running": int(row.running or 0),
                "queued": int(row.queued or 0),
                "limit": limits.get(row.endpoint, (None, None))[0],
            }
            for row in self.store.flow_usage()
        ]

    def _detach_to_stream(self, ex: Execution) -> Response:
        """Answer a request that asked for ``text/event-stream`` with its
        run's stream at once; the run executes in a worker (of any
        process), its final response arriving as the ``result`` event."""
        if ex.new_run is not None:
            self.store.insert_scheduled([ex.new_run])
            ex.new_run = None
        else:  # stored already (idempotency key, or admitted by a limit)
            self.store.release(ex.id, ex.owner)
            self.store.reschedule_now(ex.id)
        self._started(ex.id, ex.endpoint)
        self.scheduler.wake_now(ex.id)
        if ex.endpoint in self.flow_limits():
            self.scheduler.admit_soon()
        response = self.stream_response(ex.id)
        response.headers["Location"] = self.wait_url(ex.id)
        return response

    def publisher_for(self, ex: Execution) -> Publisher:
        """The publisher of ``ex``'s stream (one per execution)."""
        with self._lock:
            if ex.publisher is None:
                ex.publisher = Publisher(self.store, self.streams, ex.id)
            publisher: Publisher = ex.publisher
        return publisher

    def stream_url(self, run_id: str) -> str:
        """The run's stream URL, bound to the current request's
        credentials (as its wait URL)."""
        return self.wait_url(run_id).replace("/wait/", "/stream/", 1)

    def stream_response(self, run_id: str, after: int = 0) -> Response:
        """``200 text/event-stream`` of the run, from ``after`` on."""
        events = read_stream(
            self.store,
            self.streams,
            run_id,
            after,
            min(self.config.poll_interval, 0.25),
            self.open_stored,
        )
        response = Response(events, mimetype="text/event-stream")
        response.headers["Cache-Control"] = "no-cache"
        response.headers["X-Accel-Buffering"] = "no"
        response.headers["Durable-Run-Id"] = run_id
        return response

    def _admit(self, most: int) -> list[Claim]:
        limits = self.flow_limits()
        if not limits:
            return []
        return self.store.admit(self.new_owner(), limits, most)

    def _started(self, run_id: str, endpoint: str) -> None:
        if signals.run_started.receivers:
            signals.run_started.send(self.app, run_id=run_id, endpoint=endpoint)

    def _caller_keys(self) -> tuple[bytes, ...]:
        """The keys of caller fingerprints, newest first: the secret key
        (``DURABLE_SECRET_KEY``, else ``SECRET_KEY``, else the database's
        secret), then the fallbacks, newest first."""
        keys = self._idempotency_keys
        if keys is None:
            config = self.config
            fallbacks = list(config.secret_key_fallbacks)
            if config.secret_key is None:
                fallbacks[:0] = self.app.config.get("SECRET_KEY_FALLBACKS") or []
            secret = config.secret_key or self.app.secret_key or self.store.secret()
            keys = self._idempotency_keys = tuple(
                k.encode() if isinstance(k, str) else k
                for k in reversed([*fallbacks, secret])
            )
        return keys

    def _scoped_keys(self, key: str) -> list[str]:
        """What ``idempotency_key`` holds for ``key`` sent with this
        request: ``key`` itself without credentials (the anonymous scope,
        also that of keys stored before scopes existed), else
        ``<fingerprint>\\x1f<key>``, the fingerprint a keyed hash of the
        ``Authorization`` and ``Cookie`` headers. One value per secret key,
        the current one first (a key stays found across a rotation)."""
        values = [(name, request.headers.get(name)) for name in _CALLER_HEADERS]
        if all(value is None for _, value in values):
            return [key]
        message = b"flask-durable.idempotency-caller"
        for name, value in values:
            if value is not None:
                message += b"\0" + name.encode() + b"\0"
                message += value.encode("utf-8", "surrogatepass")
        if len(key) > 255 - 17:
            key = "#" + hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()
        scoped = []
        for secret in self._caller_keys():
            digest = hmac.new(secret, message, hashlib.sha256).digest()[:12]
            fingerprint = base64.urlsafe_b64encode(digest).decode("ascii")
            scoped.append(f"{fingerprint}{_SCOPE_SEPARATOR}{key}")
        return scoped

    def _idempotent_repeat(
        self, endpoint: str, keys: Sequence[str], request_hash: str, now: float
    ) -> Response | None:
        found = None
        for key in keys:
            found = self.store.find_idempotent(endpoint, key)
            if found is not None:
                break
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
            return stored_response(self.open_stored(found.response))
        return self.go_wait(found.id, found.status)

    # -- state changes ---------------------------------------------------------

    def suspend(self, ex: Execution, signal: _Suspend) -> Response:
        """Park a run until ``signal.due_at`` and answer with the wait URL."""
        due = signal.due_at
        if ex.deadline is not None:
            due = min(due, ex.deadline)
        inserts, updates, waits, records = ex.take_pending()
        first = ex.new_run is not None
        try:
            ex.committer.flush()
            stored = self.store.suspend(
                Suspension(
                    ex.id,
                    ex.owner,
                    ex.version,
                    signal.status,
                    due,
                    inserts,
                    updates,
                    waits,
                    ex.new_run,
                )
            )
        except UNAVAILABLE as e:
            self.forget(ex)
            return unavailable(e, ex.id)
        except BaseException:
            self.forget(ex)
            raise
        if stored is None:
            self.forget(ex)
            # Another process took the run over: its client follows it there.
            return self.go_wait(ex.id, "running")
        ex.new_run = None
        ex.in_db = True
        ex.outcome = "suspended"
        self.active.pop(ex.id, None)
        if first:
            ex.run_stored()
        ex.announce(records)
        if signals.run_suspended.receivers:
            signals.run_suspended.send(
                self.app, run_id=ex.id, status=signal.status, due_at=stored
            )
        self.scheduler.wake_at(ex.id, stored)
        if ex.endpoint in self.flow_limits():
            self.scheduler.admit_soon()  # its slot is free
        for wait in waits:
            self.events.catch_up(ex.id, wait)
        return self.go_wait(ex.id, signal.status)

    def forget(self, ex: Execution) -> None:
        """This execution ends without a final response: what it committed
        stays, and another execution continues the run."""
        if ex.outcome not in ("suspended",):
            ex.outcome = "lost"
        self.active.pop(ex.id, None)

    def finish(self, ex: Execution, response: bytes) -> None:
        """Store a run's final response (called by the capture middleware)."""
        status = ex.outcome or "failed"
        if self.storage.payloads:
            response = seal_blob(self.cipher, response)
        inserts, updates, _, records = ex.take_pending()
        first = ex.new_run is not None
        intent = Finish(
            ex.id,
            ex.owner,
            status,
            response,
            ex.error,
            inserts,
            updates,
            ex.new_run,
            waits_possible=ex.is_replay or ex.waited,
            notify=ex.preexisting,
        )
        ex.finishing = True
        ex.new_run = None

        def committed() -> None:
            self.active.pop(ex.id, None)
            if first:
                ex.run_stored()
            ex.announce(records)
            self._finished(ex.id, ex.endpoint, status, ex.error)

        def lost() -> None:
            self.active.pop(ex.id, None)
            log.warning("run %s: lease lost before its response was stored", ex.id)

        try:
            ex.committer.submit(intent, committed, lost)
        except UNAVAILABLE as e:
            # The client still gets the response; the run keeps its lease
            # and is replayed (steps memoized) to store it once it expires.
            self.active.pop(ex.id, None)
            log.warning("run %s: final response not stored: %s", ex.id, e)

    def finish_detached(
        self, claim: Claim, status: str, response: bytes, error: str | None = None
    ) -> None:
        """Finish a claimed run without executing its view."""
        if self.storage.payloads:
            response = seal_blob(self.cipher, response)
        if self.store.write(Finish(claim.id, claim.owner, status, response, error)):
            self._finished(claim.id, claim.endpoint, status, error)

    def open_stored(self, blob: bytes) -> bytes:
        """A stored request or response, decrypted if it was encrypted.

        :raises DecryptionError: no key opens it.
        """
        return open_blob(self.cipher, blob)

    def _undecryptable(self, claim: Claim, error: DecryptionError) -> None:
        """A run whose stored request no key decrypts: it fails, once."""
        text = (
            f"DecryptionError: the stored request cannot be decrypted ({error});"
            " set DURABLE_SECRET_KEY_FALLBACKS to the key it was stored with"
        )
        log.error("run %s: %s", claim.id, text)
        response = json_response(500, claim.id, error=text, run_id=claim.id)
        self.finish_detached(claim, "failed", encode_flask_response(response), text)

    def _finished(
        self, run_id: str, endpoint: str, status: str, error: str | None
    ) -> None:
        self.waiters.notify(run_id)
        self.streams.notify(run_id)
        self.scheduler.notify_finished(run_id)
        if endpoint in self.flow_limits():
            self.scheduler.admit_soon()  # its slot is free
        if endpoint in self.functions and (
            status != "completed" or run_id in self._invoked
        ):
            self._invoked.discard(run_id)
            self._function_ended(run_id, status, error)
        if status == "completed":
            if signals.run_completed.receivers:
                signals.run_completed.send(
                    self.app, run_id=run_id, endpoint=endpoint, status=status
                )
            return
        if status == "failed":
            log.error("run %s (%s) failed: %s", run_id, endpoint, error)
        if signals.run_failed.receivers:
            signals.run_failed.send(
                self.app, run_id=run_id, endpoint=endpoint, status=status
            )

    def resume(self, claim: Claim) -> None:
        """Execute a claimed run: finish it if it was cancelled or timed
        out, else replay it through the app."""
        deadline = claim.deadline
        if claim.cancel_requested or (deadline is not None and clock.now() >= deadline):
            reason = "cancelled" if claim.cancel_requested else "timeout"
            self.finish_detached(
                claim, "cancelled", encode_flask_response(cancelled(claim.id, reason))
            )
            return
        ticket = _Ticket(claim)
        try:
            environ = build_environ(claim.request, self.cipher)
        except DecryptionError as e:
            self._undecryptable(claim, e)
            return
        environ[REPLAY_KEY] = ticket
        try:
            status, headers, body = replay(self.app, environ)
        except Exception:
            # The 500 was stored by the capture middleware; the app's own
            # logging reported the error.
            log.debug("replay of run %s raised", claim.id, exc_info=True)
            return
        if ticket.reached:
            return
        code = int(status.split(" ", 1)[0])
        if code in (404, 405):
            # The route is gone from this deploy (or not there yet): the run
            # waits for a process that has it, never fails for it.
            log.warning(
                "replay of run %s (%s) found no route here (%s); rescheduled",
                claim.id,
                claim.endpoint,
                status,
            )
            self.store.reschedule(claim.id, claim.owner, clock.now() + _UNHANDLED_DELAY)
            return
        # A hook answered before the view (a before_request check): that
        # answer is the run's last.
        log.warning(
            "replay of run %s did not reach its durable view (%s); finishing it",
            claim.id,
            status,
        )
        if not any(k.lower() == "durable-run-id" for k, _ in headers):
            headers.append(("Durable-Run-Id", claim.id))
        self.finish_detached(claim, "failed", encode_response(status, headers, body))

    def cancel(self, run_id: str) -> bool:
        """See :meth:`flask_durable.Durable.cancel`."""
        self.ensure_schema()
        ex = self.active.get(run_id)
        if ex is not None:
            ex.request_cancel()
        if not self.store.request_cancel(run_id):
            return ex is not None
        claim = self.store.claim(run_id, self.new_owner(), self.endpoints(), force=True)
        if claim is not None:
            self.resume(claim)
        return True

    def retry(self, run_id: str) -> bool:
        """See :meth:`flask_durable.Durable.retry`."""
        self.ensure_schema()
        self.writer.flush()  # a final response this process has queued, too
        found = self.store.retry_failed(run_id)
        if found is None:
            return False
        if found != "failed":
            raise ValueError(
                f"run {run_id} is {found}, not failed: only a failed run can be"
                " retried (rewind runs steps of any other run again)"
            )
        self.scheduler.wake_now(run_id)
        return True

    def rewind(self, run_id: str, step_id: str) -> bool:
        """See :meth:`flask_durable.Durable.rewind`."""
        self.ensure_schema()
        self.writer.flush()  # the steps this process has queued, too
        found = self.store.rewind(run_id, step_id)
        if found is None:
            return False
        if found == "no_step":
            raise ValueError(f"run {run_id} has no step {step_id!r}")
        if found == "executing":
            raise ValueError(
                f"run {run_id} is executing (its lease is held): rewind it once"
                " it is suspended or finished"
            )
        self.scheduler.wake_now(run_id)
        return True

    def list_runs(
        self,
        status: str | None = None,
        endpoint: str | None = None,
        q: str | None = None,
        limit: int = 50,
        cursor: str | None = None,
    ) -> tuple[list[RunSummary], str | None]:
        """See :meth:`flask_durable.Durable.list_runs`."""
        if status is not None:
            try:
                status = RunStatus(status).value
            except ValueError:
                choices = ", ".join(s.value for s in RunStatus)
                raise ValueError(
                    f"unknown run status {status!r}: one of {choices}"
                ) from None
        if (
            isinstance(limit, bool)
            or not isinstance(limit, int)
            or not (1 <= limit <= _MAX_LIST_LIMIT)
        ):
            raise ValueError(
                f"limit must be an integer from 1 to {_MAX_LIST_LIMIT}, not {limit!r}"
            )
        if cursor is not None and (
            not isinstance(cursor, str)
            or not 1 <= len(cursor) <= 32
            or cursor.strip("0123456789abcdef")
        ):
            raise ValueError(f"bad cursor {cursor!r}: pass a next_cursor returned")
        self.ensure_schema()
        rows = self.store.list_runs(
            status=status,
            endpoint=endpoint or None,
            q=q or None,
            limit=limit + 1,
            before=cursor,
        )
        summaries = [
            RunSummary(
                id=row.id,
                endpoint=row.endpoint,
                status=RunStatus(row.status),
                attempt=row.attempt,
                created_at=to_datetime(row.created_at),
                updated_at=to_datetime(row.updated_at),
                finished_at=to_datetime(row.finished_at),
                due_at=to_datetime(row.due_at),
                error=row.error,
            )
            for row in rows[:limit]
        ]
        next_cursor = summaries[-1].id if len(rows) > limit else None
        return summaries, next_cursor

    def send(self, name: str, data: Any = None, event_id: str | None = None) -> str:
        """See :meth:`flask_durable.Durable.send`."""
        return self.send_events([self.events.check(name, data, event_id)])[0]

    def send_events(self, events: Sequence[Event]) -> list[str]:
        """Start the functions the events trigger, then store the events
        (all or none) and deliver them to waiting runs.

        Functions first: a crash in between leaves runs whose events were
        not stored, and sending the events again starts nothing twice (a
        function run's id comes from its event's id)."""
        self.ensure_schema()
        if self.functions:
            self.start_functions([e.as_dict() for e in events])
        return self.events.send_many(events)

    # -- functions -------------------------------------------------------------

    def register_function(self, fn: DurableFunction) -> None:
        """Serve ``fn``: its internal route, and its cron triggers."""
        if fn.id in self.functions:
            return
        self.functions[fn.id] = fn
        options = EndpointOptions(
            retries=fn.retries,
            id=fn.id,
            timeout_seconds=fn.timeout_seconds,
            flow=fn.flow,
        )

        def call() -> Response:
            payload = request.get_json()
            start_by = payload.get("start_by")
            ex = _cv_run.get()
            if start_by is not None and not ex.memo and clock.now() > start_by:
                raise _Cancelled("timeout")  # timeouts["start"] has passed
            event = payload["event"]
            if event["name"] == INVOKED_EVENT:
                self._invoked.add(ex.id)  # its parent is told when it ends
            if fn.batch is not None:
                return jsonify(fn.fn(event["data"]["events"]))
            return jsonify(fn.fn(event))

        def view() -> Any:
            if REPLAY_KEY not in request.environ:
                return json_response(404, error="not found")
            return self.execute(call, options, (), {})

        setattr(view, OPTIONS_ATTR, options)
        self.app.add_url_rule(
            self.config.url_prefix + FUNCTION_PATH + fn.id,
            endpoint=f"durable_function:{fn.id}",
            view_func=view,
            methods=["POST"],
        )
        for n, trigger in enumerate(fn.crons):
            assert trigger.crontab is not None
            self._add_cron(fn, trigger.crontab, trigger.zone, n)

    def _repair_chore(self) -> None:
        if self.functions:
            with self.app.app_context():
                self.repair_invokes()

    def _add_cron(
        self, fn: DurableFunction, crontab: str, zone: str | None, n: int
    ) -> None:
        key = cron_key(self.config.app_id, fn.id, crontab, zone)
        state: dict[str, CronClock] = {}

        def fire() -> None:
            at = clock.now()
            now = datetime.fromtimestamp(at, timezone.utc)
            ticker = state.get("ticker")
            if ticker is None:
                # Ticks are caught up from when the function was first
                # served on this database, within the retention.
                first = float(self.store.meta_value(key, str(at)))
                window = self.config.retention or 86400.0
                since = max(first, at - window)
                ticker = state["ticker"] = CronClock(
                    crontab, zone, datetime.fromtimestamp(since, timezone.utc)
                )
            ticks = ticker.due(now)
            if ticks:
                self.start_runs(fn, [tick_event(fn.id, t) for t in ticks])

        self.scheduler.add_cron(
            f"durable-cron:{fn.id}:{n}",
            CronClock(crontab, zone, datetime.now(timezone.utc)).trigger,
            fire,
        )

    def _trigger_of(self, run_id: str) -> tuple[DurableFunction, dict[str, Any], Any]:
        """The function of a function run, the event that started it, and
        its row.

        :raises LookupError: not a run of a function served here.
        """
        row = self.store.get_run(run_id)
        if row is None or row.endpoint not in self.functions:
            raise LookupError(run_id)
        _, body = decode_envelope(self.open_stored(row.request))
        return self.functions[row.endpoint], json.loads(body)["event"], row

    def _cancel_on_event(
        self, run_id: str, step_id: str, incoming: dict[str, Any]
    ) -> None:
        """An event matched a ``cancel_on`` rule of a function run."""
        try:
            fn, trigger, _ = self._trigger_of(run_id)
            rule = fn.cancel_on[int(step_id[len(CANCEL_PREFIX) :])]
            if rule.if_ is not None and rule.if_(trigger, incoming) is not True:
                return
        except (LookupError, ValueError, IndexError):
            return  # a function no longer served here, or run gone
        except Exception:
            log.warning(
                "run %s: its cancel_on condition failed on event %s; not cancelled",
                run_id,
                incoming.get("id"),
                exc_info=True,
            )
            return
        self.cancel(run_id)

    def _function_ended(self, run_id: str, status: str, error: str | None) -> None:
        """Send ``durable/function.failed`` or ``.cancelled`` for a function
        run (in the background: the caller may be the writer thread)."""

        def send() -> None:
            try:
                with self.app.app_context():
                    self.send_function_events(run_id, status, error)
            except Exception:
                log.exception("run %s: could not send its system event", run_id)

        threading.Thread(target=send, name="durable-system-event", daemon=True).start()

    def send_function_events(
        self, run_id: str, status: str, error: str | None = None
    ) -> None:
        """The events a finished function run sends: ``durable/function.
        failed`` or ``.cancelled``, and to the run that invoked it,
        ``durable/function.finished``. Their ids come from the run: sending
        them again is harmless."""
        fn, trigger, row = self._trigger_of(run_id)
        error = error or row.error
        if status in ("failed", "cancelled"):
            data = {
                "function_id": fn.id,
                "run_id": run_id,
                "error": error,
                "event": trigger,
            }
            self.send(f"durable/function.{status}", data, f"{run_id}:{status}")
        if trigger["name"] == INVOKED_EVENT:
            output = None
            if status == "completed" and row.response is not None:
                _, _, body = decode_response(self.open_stored(row.response))
                output = json.loads(body)
            finished = {
                "run_id": run_id,
                "status": status,
                "output": output,
                "error": error,
            }
            self.send(FINISHED_EVENT, finished, f"{run_id}:finished")

    def repair_invokes(self) -> int:
        """Tell waiting parents of children that ended without telling
        them (their process died in between). Run by housekeeping.

        :returns: how many parents were told.
        """
        told = 0
        for wait in self.store.waits_for(FINISHED_EVENT, clock.now()):
            child = json.loads(wait.match).get("data.run_id")
            final = self.store.get_final(child) if child else None
            if final is None or final.status not in TERMINAL_STATUSES:
                continue
            self.send_function_events(child, final.status)
            spec = WaitSpec(wait.step_id, FINISHED_EVENT, wait.match, 0.0, 0.0)
            self.events.catch_up(wait.run_id, spec)
            told += 1
        return told

    def start_functions(self, events: Sequence[dict[str, Any]]) -> list[str]:
        """Start a run of every function each event triggers.

        :returns: the ids of the runs started.
        """
        started: list[str] = []
        for fn in self.functions.values():
            wanted = []
            for event in events:
                if event["name"] not in fn.events:
                    continue
                try:
                    if fn.wants(event):
                        wanted.append(event)
                except Exception:
                    log.warning(
                        "function %s: its filter failed on event %s; not started",
                        fn.id,
                        event["id"],
                        exc_info=True,
                    )
            if wanted:
                started += self.start_runs(fn, wanted)
        return started

    def invoke(
        self, fn_id: Any, parent_id: str, step_id: str, data: dict[str, Any]
    ) -> str:
        """Start the child run of ``step.invoke`` (once: its id comes from
        the parent and the step) and return its id.

        :raises ValueError: no function ``fn_id`` here, or bad data.
        """
        fn = self.functions.get(fn_id) if isinstance(fn_id, str) else None
        if fn is None:
            raise ValueError(
                f"step.invoke({step_id!r}): no durable function {fn_id!r} in"
                f" this app (known: {sorted(self.functions)})"
            )
        checked = self.events.check(INVOKED_EVENT, data, f"invoke:{parent_id}")
        event = checked.as_dict()
        event["id"] = f"invoke:{parent_id}:{step_id}"
        basis = f"{self.config.app_id}\0{fn.id}\0invoke\0{parent_id}\0{step_id}"
        child = hashlib.sha256(basis.encode()).hexdigest()[:32]
        self.start_runs(fn, [event], [child])
        return child

    def _batch(
        self, fn: DurableFunction, events: Sequence[dict[str, Any]]
    ) -> list[str]:
        """Batched functions: events gather in the pending batch run until
        it is full or its timeout passes."""
        assert fn.batch is not None
        max_size, timeout = fn.batch
        prefix = self.config.url_prefix
        key = "batch\x1f" + fn.id
        started = []
        for event in events:
            now = clock.now()

            def add(blob: bytes, event: dict[str, Any] = event) -> tuple[bytes, int]:
                _, body = decode_envelope(self.open_stored(blob))
                batch = json.loads(body)["event"]
                batch["data"]["events"].append(event)
                environ, body = function_request(prefix, fn.id, batch)
                stored = capture_request(environ, body, self.storage)
                return stored, len(batch["data"]["events"])

            run_id = _new_run_id()
            batch_event = {
                "name": "durable/batch",
                "data": {"events": [event]},
                "id": f"batch:{run_id}",
                "ts": event["ts"],
            }
            environ, body = function_request(prefix, fn.id, batch_event)
            run = NewRun(
                id=run_id,
                app_id=self.config.app_id,
                endpoint=fn.id,
                created_at=now,
                deadline=None
                if fn.timeout_seconds is None
                else now + timeout + fn.timeout_seconds,
                owner="",
                request=capture_request(environ, body, self.storage),
                idempotency_key=key,
            )
            batch_id, new = self.store.batch(run, add, max_size, timeout)
            if new:
                self._started(batch_id, fn.id)
                started.append(batch_id)
            self.scheduler.wake_now(batch_id)
        return started

    def _debounce(
        self, fn: DurableFunction, events: Sequence[dict[str, Any]]
    ) -> list[str]:
        """Debounced functions: each event replaces the pending run of its
        key and pushes it back by the period."""
        assert fn.debounce is not None
        period, timeout, key_fn = fn.debounce
        now = clock.now()
        started = []
        for event in events:
            try:
                value = "" if key_fn is None else key_fn(event)
            except Exception:
                log.warning(
                    "function %s: its debounce key failed on event %s; not started",
                    fn.id,
                    event["id"],
                    exc_info=True,
                )
                continue
            text = value if isinstance(value, str) else repr(value)
            key = "debounce\x1f" + hashlib.sha256(text.encode()).hexdigest()
            environ, body = function_request(self.config.url_prefix, fn.id, event)
            run = NewRun(
                id=_new_run_id(),
                app_id=self.config.app_id,
                endpoint=fn.id,
                created_at=now,
                deadline=None
                if fn.timeout_seconds is None
                else now + period + fn.timeout_seconds,
                owner="",
                request=capture_request(environ, body, self.storage),
                idempotency_key=key,
            )
            run_id, new = self.store.debounce(run, period, timeout)
            if new:
                self._started(run_id, fn.id)
                started.append(run_id)
        return started

    def start_runs(
        self,
        fn: DurableFunction,
        events: Sequence[dict[str, Any]],
        run_ids: Sequence[str] | None = None,
    ) -> list[str]:
        """Store a run of ``fn`` per event, due now, and wake a worker."""
        if fn.debounce is not None and run_ids is None:
            return self._debounce(fn, events)
        if fn.batch is not None and run_ids is None:
            return self._batch(fn, events)
        now = clock.now()
        prefix = self.config.url_prefix
        runs = []
        waits: list[tuple[str, WaitSpec]] = []
        ahead: dict[str, float] = {}
        for i, event in enumerate(events):
            try:
                run_id = (
                    run_ids[i]
                    if run_ids is not None
                    else fn.run_id(self.config.app_id, event)
                )
            except Exception:
                log.warning(
                    "function %s: its idempotency expression failed on event"
                    " %s; not started",
                    fn.id,
                    event["id"],
                    exc_info=True,
                )
                continue
            flow_key = None
            if fn.flow is not None:
                try:
                    if fn.flow.rate_limit is not None and self.store.rate_limit(
                        fn.flow.rate_key_of(event), *fn.flow.rate_limit.gcra
                    ):
                        log.info(
                            "function %s: rate limit reached; event %s skipped",
                            fn.id,
                            event["id"],
                        )
                        continue
                    if fn.flow.queues:
                        flow_key = fn.flow.flow_key(event)
                except UNAVAILABLE:
                    raise
                except Exception:
                    log.warning(
                        "function %s: its limit key failed on event %s; not started",
                        fn.id,
                        event["id"],
                        exc_info=True,
                    )
                    continue
            if fn.priority is not None:
                try:
                    ahead[run_id] = float(fn.priority(event))
                except Exception:
                    log.warning(
                        "function %s: its priority failed on event %s; using 0",
                        fn.id,
                        event["id"],
                        exc_info=True,
                    )
            start_by = None if fn.start_seconds is None else now + fn.start_seconds
            environ, body = function_request(prefix, fn.id, event, start_by)
            timeout = fn.timeout_seconds
            expires = now + (timeout if timeout is not None else _CANCEL_ON_HORIZON)
            for n, rule in enumerate(fn.cancel_on):
                match = rule.wait_match(event)
                if match is not None:
                    spec = WaitSpec(
                        f"{CANCEL_PREFIX}{n}",
                        rule.event,
                        dump_json(match),
                        now,
                        expires,
                    )
                    waits.append((run_id, spec))
            runs.append(
                NewRun(
                    id=run_id,
                    app_id=self.config.app_id,
                    endpoint=fn.id,
                    created_at=now,
                    deadline=None if timeout is None else now + timeout,
                    owner="",
                    request=capture_request(environ, body, self.storage),
                    flow_key=flow_key,
                )
            )
        started = self.store.insert_scheduled(runs, waits, ahead)
        for run_id in started:
            self._started(run_id, fn.id)
            self.scheduler.wake_now(run_id)
        if started and fn.flow is not None and fn.flow.queues:
            self.scheduler.admit_soon()
        return started

    # -- reading ---------------------------------------------------------------

    def backlog(self) -> Backlog:
        """The unfinished runs of this app (read at each metrics scrape)."""
        self.ensure_schema()
        return self.store.backlog()

    def get_run(self, run_id: str) -> RunInfo | None:
        """See :meth:`flask_durable.Durable.get_run`."""
        self.ensure_schema()
        self.writer.flush()  # what this process has queued, too
        row = self.store.get_run(run_id)
        if row is None:
            return None
        records = self.store.load_steps(run_id)
        for rec in records:
            if is_sealed_text(rec.output):
                rec.output = self.cipher.decrypt_text(rec.output or "", STEP_CONTEXT)
        steps = [StepInfo.from_record(r) for r in records]
        response = None
        if row.response is not None:
            status, headers, body = decode_response(self.open_stored(row.response))
            response = (int(status.split(" ", 1)[0]), headers, body)
        return RunInfo(
            id=row.id,
            endpoint=row.endpoint,
            status=RunStatus(row.status),
            attempt=row.attempt,
            steps=steps,
            created_at=to_datetime(row.created_at),
            finished_at=to_datetime(row.finished_at),
            due_at=to_datetime(row.due_at),
            error=row.error,
            response=response,
            request=self._describe(row.request),
            updated_at=to_datetime(row.updated_at),
            **self._function_io(row.endpoint, row.request, response),
        )

    def _function_io(
        self,
        endpoint: str,
        blob: bytes,
        response: tuple[int, list[tuple[str, str]], bytes] | None,
    ) -> dict[str, Any]:
        """The event and output of a function run (nothing for others)."""
        if endpoint not in self.functions:
            return {}
        try:
            _, body = decode_envelope(self.open_stored(blob))
            found: dict[str, Any] = {"event": json.loads(body)["event"]}
        except (DecryptionError, ValueError, KeyError):
            return {}
        if response is not None and response[0] == 200:
            found["output"] = json.loads(response[2])
        return found

    def _describe(self, blob: bytes) -> dict[str, Any] | None:
        try:
            return describe_request(blob, self.cipher, self.config.sensitive_headers)
        except DecryptionError:
            return None


def _after_fork_in_child() -> None:
    for lifecycle in list(_LIFECYCLES):
        lifecycle.after_fork()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


#: How long a ``cancel_on`` rule of a function run without a finish timeout
#: is kept (its wait row is deleted with the run in any case).
_CANCEL_ON_HORIZON = 366 * 86400.0


def _wants_stream() -> bool:
    """Whether the request asks for ``text/event-stream`` first."""
    accept = request.headers.get("Accept", "")
    if "text/event-stream" not in accept:
        return False
    best = request.accept_mimetypes.best_match(
        ["text/event-stream", "application/json", "text/html"]
    )
    return best == "text/event-stream"


def get_lifecycle() -> Lifecycle:
    """The lifecycle of the current app, or a clear error."""
    try:
        return current_app.extensions["durable"]
    except KeyError:
        raise RuntimeError(
            "flask-durable is not set up on this app: call durable.init_app(app)"
        ) from None
