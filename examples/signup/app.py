"""Signup: an endpoint that answers at once, and a durable function that
sends a welcome email a "day" later unless the account is deleted first.

Run it from this directory with ``flask --app app run``, then open
http://127.0.0.1:5000/. ``WELCOME_DELAY`` (default 20 seconds, standing in
for a day) is how long the function sleeps; the "mailer" is a list in this
process. Runs are kept in ``instance/durable.sqlite3``.

- ``POST /signup`` stores the user and sends ``user/signup``: the function
  ``send-welcome`` starts in the background; the request does not wait.
- ``POST /users/<id>/delete`` sends ``user/deleted``: the function's
  ``cancel_on`` rule cancels the sleeping run of that user only.
- The dashboard at ``/durable/`` shows every run (open in debug mode; see
  ``dashboard_auth`` below for production).
"""

from __future__ import annotations

import secrets
import threading
import time
from typing import Any

from flask import Flask, jsonify, redirect, render_template, request, url_for

from flask_durable import Durable, step

durable = Durable()

#: The stand-in mailer: every email "sent", newest last.
OUTBOX: list[dict[str, Any]] = []
_outbox_lock = threading.Lock()
#: The users, by id (a real app has a table).
USERS: dict[str, dict[str, Any]] = {}


def send_email(to: str, subject: str) -> dict[str, Any]:
    message = {"to": to, "subject": subject, "at": time.time()}
    with _outbox_lock:
        OUTBOX.append(message)
    return message


def load_user(user_id: str) -> dict[str, Any]:
    user = USERS.get(user_id)
    return {"id": user_id, "email": user["email"] if user else f"{user_id}@example.com"}


@durable.function(
    "send-welcome",
    event="user/signup",
    if_="event.data.newsletter == true",
    idempotency="event.data.user_id",
    cancel_on=[{"event": "user/deleted", "match": "data.user_id"}],
)
def send_welcome(event: dict[str, Any]) -> dict[str, Any]:
    """A welcome email now, and a tips email after a "day"."""
    from flask import current_app

    user = step.run("load-user", load_user, event["data"]["user_id"])
    step.run("welcome-email", send_email, user["email"], "Welcome!")
    step.sleep("wait-a-day", current_app.config["WELCOME_DELAY"])
    step.run("tips-email", send_email, user["email"], "Three tips for your first week")
    return {"sent": 2, "to": user["email"]}


def create_app(config: dict[str, Any] | None = None, **kwargs: Any) -> Flask:
    app = Flask(__name__, **kwargs)
    app.config.update(SECRET_KEY="dev-only-signup-secret", WELCOME_DELAY=20)
    app.config.update(config or {})
    durable.init_app(app)

    @durable.dashboard_auth
    def allow() -> bool:
        # Replace with your own check (an admin session, a VPN header...).
        return app.debug

    @app.get("/")
    def index() -> str:
        runs, _ = durable.list_runs(endpoint="send-welcome", limit=20)
        return render_template(
            "index.html", users=USERS, outbox=list(reversed(OUTBOX)), runs=runs
        )

    @app.post("/signup")
    def signup() -> Any:
        body = request.get_json(silent=True) or {}
        email = (request.form.get("email") or body.get("email") or "").strip()
        if "@" not in email:
            return jsonify(error="give an email address"), 400
        user_id = "u_" + secrets.token_hex(4)
        if request.is_json:
            newsletter = body.get("newsletter", True) is True
        else:
            newsletter = request.form.get("newsletter") == "on"
        USERS[user_id] = {"email": email, "newsletter": newsletter}
        durable.send(
            "user/signup",
            {"user_id": user_id, "email": email, "newsletter": newsletter},
            id=f"signup-{user_id}",
        )
        if request.is_json:
            return jsonify(user_id=user_id), 201
        return redirect(url_for("index"))

    @app.post("/users/<user_id>/delete")
    def delete(user_id: str) -> Any:
        USERS.pop(user_id, None)
        durable.send("user/deleted", {"user_id": user_id})
        if request.is_json:
            return jsonify(deleted=user_id)
        return redirect(url_for("index"))

    return app
