"""An app module shaped as the docs show it, a module-level ``durable`` and
an app factory, for the gunicorn configuration beside it::

    gunicorn --workers 4 --threads 8 "app:create_app()"

Settings come from ``FLASK_``-prefixed environment variables, read before
``init_app`` (``FLASK_SECRET_KEY``, ``FLASK_DURABLE_DATABASE_URI``, ...).
"""

from __future__ import annotations

from typing import Any

from flask import Flask, jsonify, request

from flask_durable import Durable, step

durable = Durable()


def send_reminder(to: str) -> dict[str, str]:
    return {"sent_to": to}


def create_app() -> Flask:
    app = Flask(__name__)
    app.config.from_prefixed_env()
    durable.init_app(app)

    @app.post("/remind")
    @durable.endpoint
    def remind() -> Any:
        """Send a reminder after a delay (``"1m"`` unless the body says)."""
        body = request.get_json()
        step.sleep("delay", body.get("delay", "1m"))
        return jsonify(step.run("send", send_reminder, body["to"]))

    return app
