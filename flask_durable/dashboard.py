"""The dashboard at ``<prefix>/``: server-rendered pages to find, read and
steer runs (SPEC 8).

- ``GET <prefix>/``: the runs list (filter by status and endpoint, search
  by run id or idempotency key, keyset pagination by ``cursor``).
- ``GET <prefix>/runs/<run_id>``: one run: its steps as a waterfall with
  every attempt, the stored request (credentials masked), the final
  response, and the actions.
- ``GET <prefix>/runs/<run_id>/live``: the changing part of that page, which
  ``dashboard.js`` fetches every second until the run is finished.
- ``POST <prefix>/runs/<run_id>/retry|cancel|rewind`` and
  ``POST <prefix>/send-event``: the actions, as HTML forms carrying the CSRF
  token; a success redirects back to the run (``303``), a refusal renders
  the page again with the error and its status (``409``, ``400``, ...).

Access and CSRF are :mod:`flask_durable.access`'s, as for the JSON API.
Everything is escaped by Jinja's autoescaping; the pages load no script or
style from anywhere but ``<prefix>/static/`` (their ``Content-Security-Policy``
says so).
"""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import urlencode

from flask import Blueprint, Response, redirect, render_template, request, url_for
from flask.typing import ResponseReturnValue

from . import clock
from .access import csrf_token, guard, set_csrf_cookie
from .lifecycle import get_lifecycle
from .records import RunInfo, RunStatus
from .run_view import fmt_duration, fmt_time, run_view
from .store import UNAVAILABLE
from .views import refuse_constant

blueprint = Blueprint(
    "durable_dashboard",
    __name__,
    template_folder="templates",
    static_folder="static/durable",
    static_url_path="/static",
)
blueprint.before_request(guard)
blueprint.after_request(set_csrf_cookie)

#: Runs on one page of the list (``?limit=`` takes 1 to 200).
PAGE_SIZE = 50

_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self';"
    " connect-src 'self'; form-action 'self'; frame-ancestors 'none';"
    " base-uri 'none'"
)

_NOTICES = {
    "retry": "Retry scheduled: the run resumes from its failed step with"
    " fresh attempts.",
    "cancel": "Cancel requested.",
    "rewind": "Rewound: the step and every step after it run again.",
    "event": "Event sent.",
}


@blueprint.after_request
def _headers(response: Response) -> Response:
    """No framing, no foreign script, no caching of run data."""
    response.headers.setdefault("Content-Security-Policy", _CSP)
    response.headers.setdefault("X-Frame-Options", "DENY")
    response.headers.setdefault("X-Content-Type-Options", "nosniff")
    response.headers.setdefault("Referrer-Policy", "same-origin")
    if request.endpoint != "durable_dashboard.static":
        response.headers["Cache-Control"] = "no-store"
    return response


def _unavailable(error: Exception) -> tuple[str, int, dict[str, str]]:
    return (
        _page(
            "durable/error.html",
            title="Store unavailable",
            message="The durable store is unavailable; retry shortly.",
        ),
        503,
        {"Retry-After": "2"},
    )


for _error in UNAVAILABLE:
    blueprint.register_error_handler(_error, _unavailable)


# -- pages ---------------------------------------------------------------------


def _page(template: str, **context: Any) -> str:
    return render_template(
        template,
        csrf_token=csrf_token(),
        fmt_time=fmt_time,
        fmt_duration=fmt_duration,
        **context,
    )


def _not_found(run_id: str) -> tuple[str, int]:
    return (
        _page(
            "durable/error.html",
            title="Run not found",
            message=f"There is no run {run_id!r} in this app (it may have been"
            " pruned).",
        ),
        404,
    )


def _list_limit(value: str | None) -> int:
    try:
        return min(max(int(value or PAGE_SIZE), 1), 200)
    except ValueError:
        return PAGE_SIZE


@blueprint.get("/")
def index() -> tuple[str, int]:
    """The runs list, newest first."""
    args = request.args
    status = args.get("status") or None
    endpoint = args.get("endpoint") or None
    q = args.get("q", "").strip() or None
    cursor = args.get("cursor") or None
    limit = _list_limit(args.get("limit"))
    lifecycle = get_lifecycle()
    error = None
    try:
        runs, next_cursor = lifecycle.list_runs(status, endpoint, q, limit, cursor)
    except ValueError as e:
        runs, next_cursor, error = [], None, str(e)
    endpoints = list(lifecycle.endpoints())
    if endpoint and endpoint not in endpoints:
        endpoints.append(endpoint)
    filters = {"status": status, "endpoint": endpoint, "q": q}
    kept = {k: v for k, v in filters.items() if v}
    if limit != PAGE_SIZE:
        kept["limit"] = str(limit)
    base = url_for(".index")
    return (
        _page(
            "durable/runs.html",
            runs=runs,
            newest_url=f"{base}?{urlencode(kept)}" if cursor else None,
            older_url=(
                f"{base}?{urlencode({**kept, 'cursor': next_cursor})}"
                if next_cursor
                else None
            ),
            filters=filters,
            filtered=any((status, endpoint, q)),
            statuses=[s.value for s in RunStatus],
            endpoints=endpoints,
            error=error,
            now=clock.now(),
            flow=lifecycle.flow_usage() if not cursor else [],
        ),
        400 if error else 200,
    )


def _context(run: RunInfo) -> dict[str, Any]:
    sensitive = get_lifecycle().config.sensitive_headers
    return vars(run_view(run, clock.now(), sensitive))


def _run_page(
    run_id: str, *, error: str | None = None, code: int = 200, **extra: Any
) -> tuple[str, int]:
    run = get_lifecycle().get_run(run_id)
    if run is None:
        return _not_found(run_id)
    notice = _NOTICES.get(request.args.get("done", "")) if code == 200 else None
    return (
        _page("durable/run.html", notice=notice, error=error, **_context(run), **extra),
        code,
    )


@blueprint.get("/runs/<run_id>")
def run_page(run_id: str) -> tuple[str, int]:
    """One run: header, waterfall, request, response, actions."""
    return _run_page(run_id)


@blueprint.get("/runs/<run_id>/live")
def run_live(run_id: str) -> tuple[str, int]:
    """The part of the run page that changes while the run goes on."""
    run = get_lifecycle().get_run(run_id)
    if run is None:
        return "", 404
    return _page("durable/_run.html", **_context(run)), 200


def _back(run_id: str, done: str) -> ResponseReturnValue:
    """Post/redirect/get: back to the run page, saying what was done."""
    return redirect(url_for(".run_page", run_id=run_id, done=done), 303)


@blueprint.post("/runs/<run_id>/retry")
def retry(run_id: str) -> ResponseReturnValue:
    """Resume a failed run from its failed step, with fresh attempts."""
    try:
        found = get_lifecycle().retry(run_id)
    except ValueError as e:
        return _run_page(run_id, error=str(e), code=409)
    if not found:
        return _not_found(run_id)
    return _back(run_id, "retry")


@blueprint.post("/runs/<run_id>/cancel")
def cancel(run_id: str) -> ResponseReturnValue:
    """Cancel a run that has not finished."""
    lifecycle = get_lifecycle()
    if not lifecycle.cancel(run_id):
        run = lifecycle.get_run(run_id)
        if run is None:
            return _not_found(run_id)
        return _run_page(
            run_id, error=f"run {run_id} has already finished ({run.status})", code=409
        )
    return _back(run_id, "cancel")


@blueprint.post("/runs/<run_id>/rewind")
def rewind(run_id: str) -> ResponseReturnValue:
    """Run the chosen step and every step after it again."""
    step_id = request.form.get("step", "")
    if not step_id:
        return _run_page(run_id, error="choose a step to rewind to", code=400)
    try:
        found = get_lifecycle().rewind(run_id, step_id)
    except ValueError as e:
        return _run_page(run_id, error=str(e), code=409)
    if not found:
        return _not_found(run_id)
    return _back(run_id, "rewind")


@blueprint.post("/send-event")
def send_event() -> ResponseReturnValue:
    """Send an event (name, JSON data, optional id), then go back to the run
    the form was on (or the runs list)."""
    form = request.form
    run_id = form.get("run", "")
    name = form.get("name", "").strip()
    data_text = form.get("data", "").strip()
    event_id = form.get("id", "").strip() or None

    def refuse(message: str) -> ResponseReturnValue:
        if run_id:
            return _run_page(
                run_id,
                error=message,
                code=400,
                event_form={"name": name, "data": data_text, "id": event_id or ""},
            )
        return _page("durable/error.html", title="Event refused", message=message), 400

    try:
        data = (
            json.loads(data_text, parse_constant=refuse_constant) if data_text else None
        )
    except (ValueError, RecursionError) as e:
        return refuse(f"the event data must be JSON: {e}")
    try:
        get_lifecycle().send(name, data, event_id)
    except (TypeError, ValueError) as e:
        return refuse(f"event refused: {e}")
    if run_id:
        return _back(run_id, "event")
    return redirect(url_for(".index"), 303)
