"""The :class:`Durable` extension."""

from __future__ import annotations

import dataclasses
import functools
import logging
import re
from collections.abc import Callable, Sequence
from types import CodeType
from typing import TYPE_CHECKING, Any, Literal, TypeVar, overload

from flask import request

from .access import AccessRule, AuthCallback
from .config import Config, EndpointOptions
from .durations import Duration, parse_duration
from .flow import parse_flow
from .functions import (
    DurableFunction,
    compile_expression,
    make_cancel_rules,
    make_triggers,
)
from .lifecycle import OPTIONS_ATTR, Lifecycle, get_lifecycle
from .observability import instrument, require_extras
from .observability import logger as _logger
from .records import RunInfo, RunSummary
from .replay import REPLAY_KEY, CaptureMiddleware

if TYPE_CHECKING:
    from flask import Flask

F = TypeVar("F", bound=Callable[..., Any])


def _request_key(key: Any, what: str) -> Callable[..., Any]:
    """An endpoint's limit key: a callable of the request."""
    if not callable(key):
        raise ValueError(f"an endpoint's {what} must be a callable of the request")
    return key


_FUNCTION_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/-]{0,127}")


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

    #: A :class:`logging.Logger` (``flask_durable.app``) that drops the
    #: records logged while a replay re-runs code an earlier execution of
    #: the run already ran, so that each line is logged once per run
    #: (:doc:`observability`)::
    #:
    #:     durable.logger.info("charging order %s", order_id)
    logger: logging.Logger = _logger

    def __init__(self, app: Flask | None = None) -> None:
        #: Explicit endpoint ids, and the code of the view that took each.
        self._ids: dict[str, CodeType] = {}
        #: Who may use the dashboard, its API and the metrics.
        self._access = AccessRule()
        #: The durable functions, by id, and the apps they are served on.
        self._functions: dict[str, DurableFunction] = {}
        self._lifecycles: list[Lifecycle] = []
        if app is not None:
            self.init_app(app)

    def init_app(self, app: Flask) -> None:
        """Set up flask-durable on ``app``.

        Every ``DURABLE_*`` key is read and validated here, once
        (:doc:`config` documents each); a bad value raises
        :class:`ValueError` naming the key.

        :raises RuntimeError: if ``app`` already has flask-durable.
        :raises ValueError: for a bad configuration value.
        :raises ImportError: ``DURABLE_METRICS`` or ``DURABLE_OTEL`` is on
            and its extra (``[prometheus]``, ``[otel]``) is not installed.
        """
        if "durable" in app.extensions:
            raise RuntimeError(
                "flask-durable is already set up on this app; call init_app once"
            )
        config = Config.from_app(app)
        require_extras(config)
        lifecycle = Lifecycle(app, config)
        app.extensions["durable"] = lifecycle
        lifecycle.access = self._access
        app.wsgi_app = CaptureMiddleware(  # type: ignore[method-assign]
            app.wsgi_app,
            lifecycle.finish,
            lifecycle.forget,
            lifecycle.start_in_background,
        )
        from .cli import durable_cli
        from .views import blueprint

        prefix = lifecycle.config.url_prefix
        app.register_blueprint(blueprint, url_prefix=prefix)
        if lifecycle.config.dashboard:
            from . import api, dashboard

            app.register_blueprint(api.blueprint, url_prefix=prefix + "/api")
            app.register_blueprint(dashboard.blueprint, url_prefix=prefix)
        observer = instrument(app, lifecycle.config, lifecycle.backlog)
        if observer is not None:
            lifecycle.observer = observer
            lifecycle.call_view = observer.call_view
        self._lifecycles.append(lifecycle)
        for fn in self._functions.values():
            lifecycle.register_function(fn)
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
        checkpoint: Literal["sync", "async"] | None = None,
        concurrency: int | dict[str, Any] | None = None,
        throttle: dict[str, Any] | None = None,
        rate_limit: dict[str, Any] | None = None,
    ) -> Callable[[F], F]: ...

    def endpoint(
        self,
        view: F | None = None,
        *,
        retries: int | None = None,
        id: str | None = None,
        timeout: Duration | None = None,
        checkpoint: Literal["sync", "async"] | None = None,
        concurrency: int | dict[str, Any] | None = None,
        throttle: dict[str, Any] | None = None,
        rate_limit: dict[str, Any] | None = None,
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
        :param concurrency: at most this many runs executing at once
            (sleeping and waiting runs do not count), or ``{"limit": n,
            "key": fn}`` per value of ``fn(request)``. A request over the
            limit is answered ``303`` to its wait URL (``202`` with
            ``Prefer: respond-async``) and its run starts when a slot frees.
        :param throttle: ``{"limit": n, "period": d, "burst": b, "key":
            fn}``: runs start at most ``n`` per period; the others queue.
        :param rate_limit: ``{"limit": n, "period": d, "key": fn}``:
            requests beyond ``n`` per period are answered ``429`` with
            ``Retry-After``, before any step runs.
        :raises ValueError: for a bad option, or an ``id`` another view of
            this extension already uses (ids without ``id=`` are checked when
            the app starts: two endpoints sharing one id are a
            :class:`ValueError` then).
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

        timeout_seconds = None if timeout is None else parse_duration(timeout)
        flow = parse_flow(
            f"endpoint {id or ''!r}".replace(" ''", ""),
            id or "",
            concurrency,
            throttle,
            rate_limit,
            _request_key,
        )

        def decorator(view: F) -> F:
            scope = id or f"{view.__module__}.{view.__qualname__}"
            options = EndpointOptions(
                retries=retries,
                id=id,
                timeout_seconds=timeout_seconds,
                checkpoint=checkpoint,
                flow=None if flow is None else dataclasses.replace(flow, scope=scope),
            )
            if id is not None:
                code = getattr(view, "__code__", None)
                taken = self._ids.setdefault(id, code)  # type: ignore[arg-type]
                if code is None or taken is not code:
                    raise ValueError(
                        f"durable endpoint id {id!r} is already used by"
                        f" {taken.co_name!r} ({taken.co_filename}:"
                        f"{taken.co_firstlineno}); give each endpoint its own id"
                    )

            @functools.wraps(view)
            def wrapper(*args: Any, **kwargs: Any) -> Any:
                return get_lifecycle().execute(view, options, args, kwargs)

            setattr(wrapper, OPTIONS_ATTR, options)
            return wrapper  # type: ignore[return-value]

        if view is not None:
            return decorator(view)
        return decorator

    # -- functions ------------------------------------------------------------

    def function(
        self,
        id: str,
        *,
        event: str | Sequence[str] | None = None,
        cron: str | None = None,
        triggers: Sequence[dict[str, Any]] | None = None,
        if_: str | Callable[[dict[str, Any]], Any] | None = None,
        retries: int | None = None,
        idempotency: str | Callable[[dict[str, Any]], Any] | None = None,
        timeouts: dict[str, Duration] | None = None,
        cancel_on: Sequence[dict[str, Any]] | None = None,
        concurrency: int | dict[str, Any] | None = None,
        throttle: dict[str, Any] | None = None,
        rate_limit: dict[str, Any] | None = None,
        priority: dict[str, Any] | None = None,
        debounce: dict[str, Any] | None = None,
        batch_events: dict[str, Any] | None = None,
    ) -> Callable[[Callable[..., Any]], DurableFunction]:
        """Register a durable function, started by events or a schedule::

            @durable.function("send-welcome", event="user/signup",
                              if_="event.data.plan == 'pro'")
            def send_welcome(event):
                user = step.run("load-user", load_user, event["data"]["id"])
                step.sleep("wait-a-day", "1d")
                step.run("email", send_email, user)
                return {"sent": True}

        The function is called with the event (``name``, ``data``, ``id``,
        ``ts``) by the scheduler of any process that registered it; every
        ``step.*`` works in it as in an endpoint. Its return value (JSON) is
        the run's output (:attr:`RunInfo.output`).

        :param id: the function's stable id (letters, digits, ``._/-``).
        :param event: the event name (or names) that start it.
        :param cron: a crontab line, with an optional ``TZ=<zone>`` prefix
            (``"TZ=Europe/Paris 0 2 * * *"``): each tick starts exactly one
            run across all processes, with a ``durable/scheduled.timer``
            event.
        :param triggers: more triggers: ``{"event": name, "if": expr}`` or
            ``{"cron": line}``.
        :param if_: only events for which this is true start it: a CEL
            expression over ``event`` (compiled once) or a callable taking
            the event.
        :param retries: retries per step (default ``DURABLE_RETRIES``).
        :param idempotency: a CEL expression or callable giving a key: a
            second event with the same key starts nothing.
        :param timeouts: ``{"start": duration}`` cancels a run not started
            (no step run) in time, ``{"finish": duration}`` one not finished
            in time.
        :param cancel_on: events that cancel a run at its next step
            boundary: ``{"event": name, "match": "data.order_id"}`` (the
            incoming event's field equals the triggering event's) and/or
            ``"if"``: a CEL expression over ``event`` and ``async`` (the
            incoming event), or a callable taking both.
        :param concurrency: at most ``n`` runs executing at once, or
            ``{"limit": n, "key": expr}`` per value of ``expr`` (over
            ``event``); the others wait in a queue (status ``queued``).
        :param throttle: ``{"limit": n, "period": d, "burst": b, "key":
            expr}``: runs start at most ``n`` per period; none is dropped.
        :param rate_limit: ``{"limit": n, "period": d, "key": expr}``:
            events beyond ``n`` per period start no run.
        :param priority: ``{"run": expr}``: a run goes that many seconds
            ahead in its queue (negative: behind).
        :param debounce: ``{"period": d, "key": expr, "timeout": d}``: one
            run, with the last event, once no event (of that key) came for
            ``period``; ``timeout`` bounds how long events may keep pushing
            it back.
        :param batch_events: ``{"max_size": n, "timeout": d}``: the
            function is called with a list of up to ``n`` events, once the
            list is full or ``timeout`` after its first event.
        :raises ValueError: a bad id, trigger, expression or option, or an
            id already taken; the message names the function.
        """
        if not isinstance(id, str) or not _FUNCTION_ID.fullmatch(id):
            raise ValueError(
                f"a function id is 1 to 128 letters, digits and ._/- (starting"
                f" with a letter or digit), not {id!r}"
            )
        if retries is not None and (
            isinstance(retries, bool) or not isinstance(retries, int) or retries < 0
        ):
            raise ValueError(
                f"function {id!r}: retries must be an integer >= 0, not {retries!r}"
            )
        found = make_triggers(id, event, cron, triggers, if_)
        key = (
            None
            if idempotency is None
            else compile_expression(idempotency, id, "idempotency")
        )
        timeouts = dict(timeouts or {})
        unknown = set(timeouts) - {"start", "finish"}
        if unknown:
            raise ValueError(
                f"function {id!r}: unknown timeouts {sorted(unknown)} ('start'"
                " and 'finish' are)"
            )
        finish, start = timeouts.get("finish"), timeouts.get("start")
        rules = make_cancel_rules(id, cancel_on)

        def event_key(key: Any, what: str) -> Callable[..., Any]:
            return compile_expression(key, id, what)

        flow = parse_flow(
            f"function {id!r}", id, concurrency, throttle, rate_limit, event_key
        )
        if priority is not None and (
            not isinstance(priority, dict) or set(priority) != {"run"}
        ):
            raise ValueError(
                f"function {id!r}: priority is {{'run': expression}}, not {priority!r}"
            )
        ahead = None if priority is None else event_key(priority["run"], "priority")
        batch = None
        if batch_events is not None:
            if (
                not isinstance(batch_events, dict)
                or set(batch_events) != {"max_size", "timeout"}
                or isinstance(batch_events["max_size"], bool)
                or not isinstance(batch_events["max_size"], int)
                or batch_events["max_size"] < 1
            ):
                raise ValueError(
                    f"function {id!r}: batch_events is {{'max_size': n >= 1,"
                    f" 'timeout': d}}, not {batch_events!r}"
                )
            if flow is not None and flow.queues or debounce is not None:
                raise ValueError(
                    f"function {id!r}: batch_events cannot be combined with"
                    " concurrency, throttle or debounce"
                )
            batch = (batch_events["max_size"], parse_duration(batch_events["timeout"]))
        bounce = None
        if debounce is not None:
            if (
                not isinstance(debounce, dict)
                or set(debounce) - {"period", "key", "timeout"}
                or "period" not in debounce
            ):
                raise ValueError(
                    f"function {id!r}: debounce is {{'period': d, 'key': expr,"
                    f" 'timeout': d}}, not {debounce!r}"
                )
            if flow is not None and flow.queues:
                raise ValueError(
                    f"function {id!r}: debounce cannot be combined with"
                    " concurrency or throttle"
                )
            bounce = (
                parse_duration(debounce["period"]),
                None
                if debounce.get("timeout") is None
                else parse_duration(debounce["timeout"]),
                None
                if debounce.get("key") is None
                else event_key(debounce["key"], "debounce key"),
            )

        def decorator(fn: Callable[..., Any]) -> DurableFunction:
            if id in self._functions and self._functions[id].fn is not fn:
                raise ValueError(f"durable function id {id!r} is already used")
            durable_fn = DurableFunction(
                id=id,
                fn=fn,
                triggers=found,
                retries=retries,
                idempotency=key,
                timeout_seconds=None if finish is None else parse_duration(finish),
                cancel_on=rules,
                start_seconds=None if start is None else parse_duration(start),
                flow=flow,
                priority=ahead,
                debounce=bounce,
                batch=batch,
            )
            functools.update_wrapper(durable_fn, fn)
            self._functions[id] = durable_fn
            for lifecycle in self._lifecycles:
                lifecycle.register_function(durable_fn)
            return durable_fn

        return decorator

    # -- API -------------------------------------------------------------------

    def dashboard_auth(self, callback: AuthCallback) -> AuthCallback:
        """Register who may use the dashboard, its JSON API and the metrics::

            @durable.dashboard_auth
            def allow():
                return current_user.is_authenticated and current_user.is_admin

        ``callback`` takes no arguments, reads :data:`flask.request`, and
        returns ``True`` to allow the request; anything else (or an
        exception) answers ``403``. Without a callback these routes answer
        ``403`` unless the app runs in debug mode.
        """
        self._access.auth = callback
        return callback

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
        :raises ValueError: for a bad name or id, data nested deeper than 64
            levels or holding NUL, a lone surrogate or a non-finite number,
            or an event over ``DURABLE_MAX_EVENT_SIZE``; nothing is stored.
        :raises TypeError: for data that is not JSON-serializable.
        """
        return get_lifecycle().send(name, data, id)

    def cancel(self, run_id: str) -> bool:
        """Cancel a run: at once if it is suspended, at its next step
        boundary if it is executing. Waiters get ``409``.

        :returns: ``False`` if the run is unknown or already finished.
        """
        return get_lifecycle().cancel(run_id)

    def retry(self, run_id: str) -> bool:
        """Run a ``failed`` run again from the step that failed, with fresh
        attempts.

        Steps that completed stay memoized (they do not run again); each step
        that failed for good starts again from attempt 0, its earlier
        attempts kept in :attr:`StepInfo.attempt_errors`. A run that failed
        outside any step is replayed. The run becomes ``scheduled``, due now,
        its stored response and error cleared: a client that asks its wait
        URL again gets the new final response.

        Only failed runs are retried: a cancelled run stays cancelled (use
        :meth:`rewind` to run its steps again). A run whose endpoint
        ``timeout`` has passed is cancelled again as soon as it resumes.

        :returns: ``False`` if the run is unknown (in this app).
        :raises ValueError: if the run is not ``failed``.
        """
        return get_lifecycle().retry(run_id)

    def rewind(self, run_id: str, step_id: str) -> bool:
        """Run step ``step_id`` of a run, and every step after it, again.

        Those steps are forgotten (with the waits of their
        ``step.wait_for_event``), the steps before them stay memoized, and
        the run becomes ``scheduled``, due now; a finished run's response
        and error are cleared, and its wait URL answers the new final
        response. Works on a run in any state except executing.

        :param step_id: the step's id as :attr:`StepInfo.id` shows it
            (``"charge"``, ``"charge:1"``, ...).
        :returns: ``False`` if the run is unknown (in this app).
        :raises ValueError: if the run has no such step, or is executing
            now (it holds an unexpired lease).
        """
        return get_lifecycle().rewind(run_id, step_id)

    def list_runs(
        self,
        status: str | None = None,
        endpoint: str | None = None,
        q: str | None = None,
        limit: int = 50,
        cursor: str | None = None,
    ) -> tuple[list[RunSummary], str | None]:
        """The runs of this app, newest first, a page at a time::

            runs, cursor = durable.list_runs(status="failed")
            while cursor:
                more, cursor = durable.list_runs(status="failed", cursor=cursor)

        :param status: only runs with this status (a :class:`RunStatus`
            value).
        :param endpoint: only runs of this endpoint id.
        :param q: only the run with this id, or the runs holding this
            ``Idempotency-Key``.
        :param limit: at most this many runs (1 to 1000).
        :param cursor: the ``next_cursor`` of the previous page.
        :returns: ``(runs, next_cursor)``: :class:`~flask_durable.records.RunSummary`
            objects, and the cursor of the next page (``None`` on the last).
        :raises ValueError: for an unknown status, a bad limit or cursor.
        """
        return get_lifecycle().list_runs(status, endpoint, q, limit, cursor)

    def get_run(self, run_id: str) -> RunInfo | None:
        """A read-only view of a run of this app, or ``None`` if unknown.

        Checkpoints this process still has queued (``"async"`` mode) are
        committed first, so a run just answered here is seen whole.
        """
        return get_lifecycle().get_run(run_id)

    def start(self) -> None:
        """Start the scheduler in this process now (for example from a
        gunicorn ``post_worker_init`` hook, see :doc:`deployment`) instead
        of on the first request."""
        get_lifecycle().ensure_ready(scheduler=True)

    def shutdown(self) -> None:
        """Stop the scheduler of the current app and close its database
        connections (tests, graceful shutdown)."""
        get_lifecycle().close()
