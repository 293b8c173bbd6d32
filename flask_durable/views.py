"""The blueprint mounted at ``DURABLE_URL_PREFIX``: the wait URL and the
events route."""

from __future__ import annotations

import hmac
import time
from typing import Any

from flask import Blueprint, Response, request

from .lifecycle import get_lifecycle
from .records import TERMINAL_STATUSES
from .responses import json_response, prefers_async, stored_response, unavailable
from .store import UNAVAILABLE

blueprint = Blueprint("durable", __name__)


def _database_unavailable(error: Exception) -> Response:
    return unavailable(error)


for _error in UNAVAILABLE:
    blueprint.register_error_handler(_error, _database_unavailable)


@blueprint.get("/wait/<token>")
def wait(token: str) -> Response:
    """Long-poll until the run is finished, then answer with its final
    response exactly as the view produced it."""
    lifecycle = get_lifecycle()
    run_id = lifecycle.tokens.unsign(token)
    if run_id is None:
        return json_response(404, error="unknown or invalid wait token")
    lifecycle.start_in_background()
    deadline = time.monotonic() + lifecycle.config.wait_timeout
    status = "unknown"
    while True:
        listener = lifecycle.waiters.subscribe(run_id)
        try:
            found = lifecycle.store.get_final(run_id)
            if found is None:
                return json_response(404, error="unknown run", run_id=run_id)
            status = found.status
            if status in TERMINAL_STATUSES and found.response is not None:
                return stored_response(found.response)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            listener.wait(min(remaining, lifecycle.config.poll_interval))
        finally:
            lifecycle.waiters.unsubscribe(run_id, listener)
    if prefers_async(request.headers.get("Prefer")):
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
    payload = request.get_json(silent=True)
    if payload is None:
        return json_response(400, error="the body must be JSON: an event or a list")
    items = payload if isinstance(payload, list) else [payload]
    if not items or len(items) > 1000:
        return json_response(400, error="send 1 to 1000 events at once")
    checked: list[tuple[str, Any, str | None]] = []
    for i, item in enumerate(items):
        problem = _check_event(item)
        if problem is not None:
            return json_response(400, error=f"event {i}: {problem}")
        checked.append((item["name"], item.get("data"), item.get("id")))
    ids = [lifecycle.send(name, data, event_id) for name, data, event_id in checked]
    return json_response(202, ids=ids)


def _check_event(item: Any) -> str | None:
    if not isinstance(item, dict):
        return "an event must be a JSON object"
    unknown = set(item) - {"name", "data", "id", "ts"}
    if unknown:
        return f"unknown fields {sorted(unknown)}"
    name = item.get("name")
    if not isinstance(name, str) or not name or len(name) > 255:
        return "name must be a string of 1 to 255 characters"
    data = item.get("data")
    if data is not None and not isinstance(data, dict):
        return "data must be a JSON object"
    event_id = item.get("id")
    if event_id is not None and (
        not isinstance(event_id, str) or not event_id or len(event_id) > 128
    ):
        return "id must be a string of 1 to 128 characters"
    return None
