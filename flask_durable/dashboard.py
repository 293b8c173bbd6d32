"""The dashboard at ``<prefix>/``: server-rendered pages to find, read and
steer runs (SPEC 8)."""

from __future__ import annotations

from flask import Blueprint, render_template

from .access import csrf_token, guard, set_csrf_cookie

blueprint = Blueprint(
    "durable_dashboard",
    __name__,
    template_folder="templates",
    static_folder="static/durable",
    static_url_path="/static",
)
blueprint.before_request(guard)
blueprint.after_request(set_csrf_cookie)


@blueprint.get("/")
def index() -> str:
    """The runs list."""
    return render_template("durable/runs.html", csrf_token=csrf_token())
