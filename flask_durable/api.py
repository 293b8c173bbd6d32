"""The JSON API under ``<prefix>/api/`` (SPEC 8): list and read runs,
retry, cancel and rewind them, send events. Same access rule and CSRF
protection as the dashboard (:mod:`flask_durable.access`); the OpenAPI 3.1
document describing it is served at ``<prefix>/api/openapi.json``."""

from __future__ import annotations

import base64
import json
from collections.abc import Collection
from datetime import datetime
from typing import Any

from flask import Blueprint, Response, request

from .access import csrf_token, guard, set_csrf_cookie
from .lifecycle import get_lifecycle
from .records import RunInfo, RunStatus, RunSummary, StepInfo
from .replay import ALWAYS_SENSITIVE, MASK
from .responses import json_response
from .store import UNAVAILABLE
from .views import database_unavailable, parse_events

blueprint = Blueprint("durable_api", __name__)
blueprint.before_request(guard)
blueprint.after_request(set_csrf_cookie)


for _error in UNAVAILABLE:
    blueprint.register_error_handler(_error, database_unavailable)


# -- JSON shapes -------------------------------------------------------------


def _time(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat()


def _jsonable(value: Any) -> Any:
    """A step output as JSON can carry it (other types as their ``repr``)."""
    try:
        json.dumps(value, allow_nan=False)
        return value
    except (TypeError, ValueError):
        return repr(value)


def summary_to_json(run: RunSummary) -> dict[str, Any]:
    """One run of a list, as the API answers it."""
    return {
        "id": run.id,
        "endpoint": run.endpoint,
        "status": run.status.value,
        "attempt": run.attempt,
        "created_at": _time(run.created_at),
        "updated_at": _time(run.updated_at),
        "finished_at": _time(run.finished_at),
        "due_at": _time(run.due_at),
        "error": run.error,
    }


def step_to_json(step: StepInfo) -> dict[str, Any]:
    """One step of a run, every failed attempt with its traceback."""
    return {
        "id": step.id,
        "status": step.status,
        "attempts": step.attempts,
        "output": _jsonable(step.output),
        "error": step.error,
        "started_at": _time(step.started_at),
        "finished_at": _time(step.finished_at),
        "due_at": _time(step.due_at),
        "attempt_errors": [
            {**entry, "at": _time(entry.get("at"))} for entry in step.attempt_errors
        ],
    }


def response_to_json(
    response: tuple[int, list[tuple[str, str]], bytes] | None,
    hidden: Collection[str] = (),
) -> dict[str, Any] | None:
    """A final response: its body as text when it is UTF-8, else base64;
    credentials, ``Set-Cookie`` and the headers named in ``hidden``
    (lower-case) masked."""
    if response is None:
        return None
    status, headers, body = response
    masked = ALWAYS_SENSITIVE | {"set-cookie"} | set(hidden)
    shown: dict[str, Any] = {
        "status": status,
        "headers": [[k, MASK if k.lower() in masked else v] for k, v in headers],
    }
    try:
        shown["body"] = body.decode("utf-8")
    except UnicodeDecodeError:
        shown["body_base64"] = base64.b64encode(body).decode("ascii")
    return shown


def run_to_json(run: RunInfo, hidden: Collection[str] = ()) -> dict[str, Any]:
    """A whole run, as ``GET runs/<run_id>`` answers it (``hidden``: more
    response headers to mask, as :func:`response_to_json`)."""
    shown = {
        "id": run.id,
        "endpoint": run.endpoint,
        "status": run.status.value,
        "attempt": run.attempt,
        "created_at": _time(run.created_at),
        "updated_at": _time(run.updated_at),
        "finished_at": _time(run.finished_at),
        "due_at": _time(run.due_at),
        "error": run.error,
        "steps": [step_to_json(s) for s in run.steps],
        "request": run.request,
        "response": response_to_json(run.response, hidden),
    }
    if run.endpoint and (run.event is not None or run.output is not None):
        shown["event"] = run.event
        shown["output"] = _jsonable(run.output)
    return shown


def _body() -> dict[str, Any] | Response:
    """The request's JSON object body (empty when there is none)."""
    if not request.get_data():
        return {}
    try:
        body = json.loads(request.get_data())
    except ValueError:
        return json_response(400, error="the body must be a JSON object")
    if not isinstance(body, dict):
        return json_response(400, error="the body must be a JSON object")
    return body


def _no_run(run_id: str) -> Response:
    return json_response(404, error=f"no run {run_id!r} in this app")


# -- routes ------------------------------------------------------------------


@blueprint.get("/runs")
def list_runs() -> Response:
    """A page of runs, newest first: ``runs`` and ``next_cursor``."""
    args = request.args
    unknown = set(args) - {"status", "endpoint", "q", "limit", "cursor"}
    if unknown:
        return json_response(400, error=f"unknown parameters {sorted(unknown)}")
    try:
        limit = int(args.get("limit", "50"))
    except ValueError:
        return json_response(400, error="limit must be an integer from 1 to 1000")
    try:
        runs, cursor = get_lifecycle().list_runs(
            args.get("status") or None,
            args.get("endpoint") or None,
            args.get("q") or None,
            limit,
            args.get("cursor") or None,
        )
    except ValueError as e:
        return json_response(400, error=str(e))
    return json_response(
        200, runs=[summary_to_json(r) for r in runs], next_cursor=cursor
    )


@blueprint.get("/runs/<run_id>")
def get_run(run_id: str) -> Response:
    """One run with its steps, stored request and final response."""
    lifecycle = get_lifecycle()
    run = lifecycle.get_run(run_id)
    if run is None:
        return _no_run(run_id)
    return json_response(200, **run_to_json(run, lifecycle.config.sensitive_headers))


@blueprint.post("/runs/<run_id>/retry")
def retry(run_id: str) -> Response:
    """Resume a failed run from its failed step, with fresh attempts."""
    try:
        found = get_lifecycle().retry(run_id)
    except ValueError as e:
        return json_response(409, error=str(e))
    if not found:
        return _no_run(run_id)
    return json_response(202, run_id=run_id, status=RunStatus.SCHEDULED.value)


@blueprint.post("/runs/<run_id>/cancel")
def cancel(run_id: str) -> Response:
    """Cancel a run that has not finished."""
    lifecycle = get_lifecycle()
    if not lifecycle.cancel(run_id):
        if lifecycle.store.get_final(run_id) is None:
            return _no_run(run_id)
        return json_response(409, error=f"run {run_id} has already finished")
    return json_response(202, run_id=run_id)


@blueprint.post("/runs/<run_id>/rewind")
def rewind(run_id: str) -> Response:
    """Run a step (``{"step": "<step id>"}``) and every step after it
    again."""
    body = _body()
    if isinstance(body, Response):
        return body
    step_id = body.get("step")
    if not isinstance(step_id, str) or not step_id:
        return json_response(400, error='send {"step": "<step id>"}')
    try:
        found = get_lifecycle().rewind(run_id, step_id)
    except ValueError as e:
        return json_response(409, error=str(e))
    if not found:
        return _no_run(run_id)
    return json_response(202, run_id=run_id, status=RunStatus.SCHEDULED.value)


@blueprint.post("/events")
def send_events() -> Response:
    """Send one event or a list (as the bearer-key events route takes
    them)."""
    checked = parse_events()
    if isinstance(checked, Response):
        return checked
    return json_response(202, ids=get_lifecycle().send_events(checked))


@blueprint.get("/flow")
def flow_usage() -> Response:
    """Each flow-control key with unfinished runs: how many execute and how
    many wait for a slot."""
    return json_response(200, keys=get_lifecycle().flow_usage())


@blueprint.get("/csrf")
def csrf() -> Response:
    """A CSRF token for scripts (the cookie it goes with is set too)."""
    return json_response(200, csrf_token=csrf_token())


@blueprint.get("/openapi.json")
def openapi() -> Response:
    """The OpenAPI 3.1 document of this API."""
    from .openapi import document

    prefix = get_lifecycle().config.url_prefix
    return Response(json.dumps(document(prefix)), mimetype="application/json")
