"""Who may use the dashboard, its JSON API and the metrics, and the CSRF
protection of their actions.

Access is decided by the callable registered with
:meth:`Durable.dashboard_auth <flask_durable.Durable.dashboard_auth>`.
Without one, the routes are open in debug mode only; otherwise they answer
``403`` with a JSON error that says how to register one.

Every ``POST`` also needs a CSRF token (double submit): the dashboard sets
a random cookie, and a request must carry ``HMAC(key, cookie)`` in the
``X-CSRF-Token`` header or the ``csrf_token`` form field. Pages embed the
token; scripts get one from ``GET <prefix>/api/csrf``, which also sets the
cookie. A browser request another site starts (``Sec-Fetch-Site:
cross-site``) is refused whatever it carries.
"""

from __future__ import annotations

import hmac
import logging
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from flask import Response, current_app, g, request

from .responses import json_response

log = logging.getLogger("flask_durable")

#: The cookie holding the browser's random CSRF value.
CSRF_COOKIE = "durable_csrf"
#: The header carrying the CSRF token.
CSRF_HEADER = "X-CSRF-Token"
#: The form field carrying the CSRF token.
CSRF_FIELD = "csrf_token"

_CSRF_PURPOSE = b"flask-durable.csrf"

#: A callable taking no arguments that returns ``True`` to allow the
#: current request (it reads :data:`flask.request`).
AuthCallback = Callable[[], bool]


@dataclass
class AccessRule:
    """The dashboard's access rule, shared by every app of one
    :class:`~flask_durable.Durable`."""

    auth: AuthCallback | None = None


def _lifecycle() -> Any:
    # Not get_lifecycle(): the lifecycle imports this module.
    return current_app.extensions["durable"]


def _rule() -> AccessRule:
    rule: AccessRule = _lifecycle().access
    return rule


def check_access() -> Response | None:
    """``None`` when the current request may use the dashboard, its API or
    the metrics, else the ``403`` to answer."""
    auth = _rule().auth
    if auth is None:
        if current_app.debug:
            return None
        return json_response(
            403,
            error=(
                "the flask-durable dashboard is closed: register who may use it"
                " with @durable.dashboard_auth (a function returning True to"
                " allow the current request), or run the app in debug mode"
            ),
        )
    try:
        allowed = auth()
    except Exception:
        log.exception("the dashboard_auth callback raised; the request is refused")
        allowed = False
    if allowed is True:
        return None
    return json_response(403, error="not allowed by the dashboard_auth callback")


def _key() -> bytes:
    key: bytes = _lifecycle().tokens.derive(_CSRF_PURPOSE)
    return key


def _token_for(value: str) -> str:
    return hmac.new(_key(), value.encode("ascii", "replace"), "sha256").hexdigest()


def csrf_token() -> str:
    """The CSRF token of the current browser (a new cookie is set with the
    response when it has none)."""
    value = request.cookies.get(CSRF_COOKIE) or g.get("durable_csrf_new")
    if not value:
        value = secrets.token_urlsafe(24)
        g.durable_csrf_new = value
    return _token_for(value)


def set_csrf_cookie(response: Response) -> Response:
    """Set the cookie :func:`csrf_token` chose for this browser, if new."""
    value = g.get("durable_csrf_new")
    if value:
        response.set_cookie(
            CSRF_COOKIE,
            value,
            httponly=True,
            samesite="Strict",
            secure=request.is_secure,
            path="/",
        )
    return response


def check_csrf() -> Response | None:
    """``None`` when a ``POST`` carries a valid CSRF token, else the
    ``403`` to answer. Other methods pass."""
    if request.method in ("GET", "HEAD", "OPTIONS"):
        return None
    if request.headers.get("Sec-Fetch-Site") == "cross-site":
        return json_response(403, error="cross-site request refused")
    cookie = request.cookies.get(CSRF_COOKIE)
    sent = request.headers.get(CSRF_HEADER)
    if sent is None and request.mimetype in (
        "application/x-www-form-urlencoded",
        "multipart/form-data",
    ):
        sent = request.form.get(CSRF_FIELD)
    if not cookie or not sent or not hmac.compare_digest(sent, _token_for(cookie)):
        return json_response(
            403,
            error=(
                f"missing or invalid CSRF token: send the {CSRF_COOKIE} cookie and"
                f" its token in the {CSRF_HEADER} header (GET the api/csrf route"
                " for both)"
            ),
        )
    return None


def guard() -> Response | None:
    """``before_request`` of the dashboard and API blueprints: access, then
    CSRF."""
    return check_access() or check_csrf()
