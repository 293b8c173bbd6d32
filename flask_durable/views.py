"""The blueprint mounted at ``DURABLE_URL_PREFIX``: the wait URL and the
events route."""

from __future__ import annotations

import hmac
import json
import time
from pathlib import Path
from typing import Any

from flask import Blueprint, Response, request, send_from_directory

from .events import Event, EventTooLarge
from .lifecycle import get_lifecycle
from .records import TERMINAL_STATUSES
from .replay import read_body
from .responses import json_response, prefers_async, stored_response, unavailable
from .store import UNAVAILABLE

blueprint = Blueprint("durable", __name__)


def database_unavailable(error: Exception) -> Response:
    """``503`` for a database error (error handler of the blueprints)."""
    return unavailable(error)


for _error in UNAVAILABLE:
    blueprint.register_error_handler(_error, database_unavailable)


#: How long a wait request beyond ``DURABLE_MAX_HELD_WAITS`` is held before
#: its ``303`` to itself: long enough that a client following redirects does
#: not spin through its redirect limit, short enough that the threads it
#: passes through serve everyone else at once.
SHORT_HOLD = 0.02


@blueprint.get("/wait/<token>")
def wait(token: str) -> Response:
    """Long-poll until the run is finished, then answer with its final
    response exactly as the view produced it.

    At most ``DURABLE_MAX_HELD_WAITS`` requests per process long-poll at
    once; the others are held for :data:`SHORT_HOLD` only, and a request
    with ``Prefer: respond-async`` is not held at all: waiting clients never
    hold every thread of a server."""
    lifecycle = get_lifecycle()
    run_id = lifecycle.tokens.unsign(token, request.headers)
    if run_id is None:
        return json_response(404, error="unknown, invalid or expired wait token")
    settle = lifecycle.settle
    if settle is not None:
        # Under DurableTester: the run goes as far as it can now, and the
        # answer is not held (nothing else would move it meanwhile).
        settle(run_id)
        status, final = _wait_for(run_id, 0.0)
        if final is not None:
            return final
        response = json_response(202, run_id, run_id=run_id, status=status)
        response.headers["Location"] = request.path
        return response
    lifecycle.start_in_background()
    respond_async = prefers_async(request.headers.get("Prefer"))
    held = not respond_async and lifecycle.held_waits.acquire(blocking=False)
    try:
        timeout = lifecycle.config.wait_timeout
        hold = 0.0 if respond_async else timeout if held else min(SHORT_HOLD, timeout)
        status, final = _wait_for(run_id, hold)
    finally:
        if held:
            lifecycle.held_waits.release()
    if final is not None:
        return final
    if respond_async:
        response = json_response(202, run_id, run_id=run_id, status=status)
        response.headers["Retry-After"] = "1"
        response.headers["Location"] = request.path
        response.headers["Preference-Applied"] = "respond-async"
        return response
    response = json_response(
        303, run_id, run_id=run_id, status=status, wait_url=request.path
    )
    response.headers["Location"] = request.path
    return response


@blueprint.get("/stream.js")
def stream_js() -> Response:
    """The browser helper that reads run streams (``DurableStream``)."""
    static = Path(__file__).parent / "static" / "durable"
    response = send_from_directory(static, "stream.js", max_age=3600)
    return response


@blueprint.get("/stream/<token>")
def stream(token: str) -> Response:
    """The run's events as ``text/event-stream``: ``chunk``, ``step`` and
    ``reset`` as its streaming steps publish them, then ``result`` (the
    final response). ``Last-Event-ID`` resumes after that event; a client
    joining late gets everything from the start."""
    lifecycle = get_lifecycle()
    run_id = lifecycle.tokens.unsign(token, request.headers)
    if run_id is None:
        return json_response(404, error="unknown, invalid or expired stream token")
    last = request.headers.get("Last-Event-ID", "0").strip() or "0"
    if not last.isascii() or not last.isdigit() or len(last) > 12:
        return json_response(400, error="Last-Event-ID must be an event id")
    lifecycle.start_in_background()
    if lifecycle.store.get_final(run_id) is None:
        return json_response(404, error="unknown run", run_id=run_id)
    return lifecycle.stream_response(run_id, int(last))


def _wait_for(run_id: str, hold: float) -> tuple[str, Response | None]:
    """The run's status and, once it is terminal, its final response
    (or a ``404``), waiting up to ``hold`` seconds for it."""
    lifecycle = get_lifecycle()
    deadline = time.monotonic() + hold
    while True:
        listener = lifecycle.waiters.subscribe(run_id)
        try:
            found = lifecycle.store.get_final(run_id)
            if found is None:
                return "unknown", json_response(404, error="unknown run", run_id=run_id)
            if found.status in TERMINAL_STATUSES and found.response is not None:
                blob = lifecycle.open_stored(found.response)
                return found.status, stored_response(blob)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return found.status, None
            listener.wait(min(remaining, lifecycle.config.poll_interval))
        finally:
            lifecycle.waiters.unsubscribe(run_id, listener)


@blueprint.post("/events")
def events() -> Response:
    """Record one event or a list of them: ``{"name", "data", "id"}``."""
    lifecycle = get_lifecycle()
    event_key = lifecycle.config.event_key
    if not event_key:
        return json_response(404, error="not found")
    auth = request.headers.get("Authorization", "")
    scheme, _, key = auth.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(
        key.strip().encode(), event_key.encode()
    ):
        response = json_response(401, error="missing or wrong bearer key")
        response.headers["WWW-Authenticate"] = 'Bearer realm="durable-events"'
        return response
    checked = parse_events()
    if isinstance(checked, Response):
        return checked
    return json_response(202, ids=lifecycle.send_events(checked))


def parse_events() -> list[Event] | Response:
    """The events in the request's JSON body (one, or a list of 1 to 1000),
    each checked, or the ``400``/``413`` to answer: a list is all or
    nothing."""
    lifecycle = get_lifecycle()
    limit = lifecycle.config.max_event_size
    body = read_body(request, limit) if request.is_json else b""
    if body is None:
        return json_response(
            413,
            error=f"the body is over DURABLE_MAX_EVENT_SIZE ({limit} bytes)",
            limit=limit,
        )
    try:
        payload = json.loads(body, parse_constant=refuse_constant)
    except (ValueError, RecursionError):  # RecursionError: nested too deeply
        return json_response(400, error="the body must be JSON: an event or a list")
    items = payload if isinstance(payload, list) else [payload]
    if not items or len(items) > 1000:
        return json_response(400, error="send 1 to 1000 events at once")
    checked: list[Event] = []
    for i, item in enumerate(items):
        problem = _check_event(item)
        if problem is not None:
            return json_response(400, error=f"event {i}: {problem}")
        try:
            checked.append(
                lifecycle.events.check(
                    item.get("name"), item.get("data"), item.get("id")
                )
            )
        except EventTooLarge as e:
            return json_response(
                413, error=f"event {i}: {e}", limit=lifecycle.events.max_size
            )
        except (TypeError, ValueError) as e:
            return json_response(400, error=f"event {i}: {e}")
    return checked


def refuse_constant(name: str) -> Any:
    """``parse_constant`` for :func:`json.loads`: NaN and Infinity are not
    JSON."""
    raise ValueError(f"{name} is not JSON")


def _check_event(item: Any) -> str | None:
    """What the events route requires besides :meth:`EventBus.check`."""
    if not isinstance(item, dict):
        return "an event must be a JSON object"
    unknown = set(item) - {"name", "data", "id", "ts"}
    if unknown:
        return f"unknown fields {sorted(unknown)}"
    data = item.get("data")
    if data is not None and not isinstance(data, dict):
        return "data must be a JSON object"
    return None
