"""The dashboard's HTML pages (``flask_durable/dashboard.py``) through
Flask's test client: access, the runs list, the run page, escaping, CSRF
and the actions' refusals. The same pages in a real browser are in
``test_dashboard_browser.py``."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from dashboard_app import (
    ADMIN_COOKIE,
    ADMIN_SECRET,
    FIXED,
    GATE,
    build_app,
    calls,
    reset,
    wait_status,
)
from flask import Flask
from flask.testing import FlaskClient

from flask_durable import Durable


@pytest.fixture
def app(tmp_path: Path) -> Iterator[Flask]:
    reset()
    app = build_app(tmp_path / "durable.sqlite3")
    yield app
    app.extensions["durable"].close()


@pytest.fixture
def admin(app: Flask) -> FlaskClient:
    """A client the dashboard lets in."""
    client = app.test_client()
    client.set_cookie(ADMIN_COOKIE, ADMIN_SECRET)
    return client


def start(client: FlaskClient, path: str, **kw: Any) -> str:
    """Start a durable run; its id."""
    response = client.post(path, **kw)
    assert response.status_code in (200, 303, 500), response.text
    return response.headers["Durable-Run-Id"]


def csrf_of(html: str) -> str:
    found = re.search(r'<meta name="csrf-token" content="([0-9a-f]+)">', html)
    assert found, "no CSRF token in the page"
    return found.group(1)


def run_ids(html: str) -> list[str]:
    return re.findall(r'class="mono run-link" href="/durable/runs/([0-9a-f]+)"', html)


# -- access --------------------------------------------------------------------


def test_closed_without_auth_callback_outside_debug(tmp_path: Path) -> None:
    app = Flask("closed", instance_path=str(tmp_path / "instance"))
    app.config.update(
        SECRET_KEY="k", DURABLE_DATABASE_URI=f"sqlite:///{tmp_path / 'd.sqlite3'}"
    )
    Durable(app)  # no @dashboard_auth
    try:
        client = app.test_client()
        for path in ("/durable/", "/durable/runs/abc", "/durable/static/dashboard.js"):
            with client.get(path) as response:
                assert response.status_code == 403, path
                assert "dashboard_auth" in response.get_json()["error"]
        assert client.post("/durable/runs/abc/cancel").status_code == 403

        app.debug = True  # open in debug mode, for a developer's machine
        assert client.get("/durable/").status_code == 200
    finally:
        app.extensions["durable"].close()


def test_auth_callback_decides(app: Flask, admin: FlaskClient) -> None:
    stranger = app.test_client()
    refused = stranger.get("/durable/")
    assert refused.status_code == 403
    assert refused.get_json() == {"error": "not allowed by the dashboard_auth callback"}
    stranger.set_cookie(ADMIN_COOKIE, "guess")
    assert stranger.get("/durable/").status_code == 403

    page = admin.get("/durable/")
    assert page.status_code == 200
    assert page.mimetype == "text/html"
    assert "<h1>Runs</h1>" in page.text
    with admin.get("/durable/static/dashboard.css") as css:
        assert css.status_code == 200
    # No framing, no script from elsewhere.
    assert page.headers.get("X-Frame-Options") == "DENY"
    assert "script-src 'self'" in page.headers.get("Content-Security-Policy", "")


# -- the runs list -------------------------------------------------------------


def test_runs_list_filters_search_and_pages(app: Flask, admin: FlaskClient) -> None:
    threes = [start(admin, "/three") for _ in range(3)]
    broken = start(admin, "/broken")
    keyed = start(
        admin, "/order", json={"sleep": 0}, headers={"Idempotency-Key": "order-77"}
    )
    wait_status(app, broken, "failed")
    wait_status(app, keyed, "completed")

    everything = admin.get("/durable/").text
    listed = run_ids(everything)
    assert sorted(listed) == sorted([keyed, broken, *threes])
    assert listed == sorted(listed, reverse=True)  # newest first (ids by time)
    for endpoint in ("three", "broken", "order", "nap", "approve"):
        assert f'<option value="{endpoint}">' in everything

    assert run_ids(admin.get("/durable/?status=failed").text) == [broken]
    only_three = run_ids(admin.get("/durable/?endpoint=three").text)
    assert sorted(only_three) == sorted(threes)
    assert run_ids(admin.get("/durable/?q=order-77").text) == [keyed]
    assert run_ids(admin.get(f"/durable/?q={threes[0]}").text) == [threes[0]]
    none = admin.get("/durable/?status=cancelled").text
    assert run_ids(none) == [] and "No runs match these filters" in none

    # Keyset pages of two, by the "Older" link, filters kept.
    seen: list[str] = []
    url = "/durable/?limit=2"
    for _ in range(3):
        html = admin.get(url).text
        seen += run_ids(html)
        older = re.search(r'<a class="button" rel="next" href="([^"]+)"', html)
        if older is None:
            break
        url = older.group(1).replace("&amp;", "&")
        assert "limit=2" in url and "cursor=" in url
    assert seen == listed
    assert "Newest</a>" in html  # back to the first page

    bad = admin.get("/durable/?status=bogus")
    assert bad.status_code == 400
    assert "unknown run status" in bad.text


# -- the run page ------------------------------------------------------------------


def test_run_page_shows_attempts_request_and_response(
    app: Flask, admin: FlaskClient
) -> None:
    run_id = start(
        admin,
        "/order",
        json={"order": "B-9", "sleep": 0.05},
        headers={"Authorization": "Bearer sk_secret_value"},
    )
    wait_status(app, run_id, "completed")
    page = admin.get(f"/durable/runs/{run_id}")
    assert page.status_code == 200
    html = page.text
    for step_id in ("reserve", "charge", "cool-off", "receipt"):
        assert f'data-step="{step_id}"' in html
    # Every failed attempt, with its error and traceback; then the success.
    assert html.count('class="attempt-failed"') == 2
    assert "payment gateway timed out (call 1)" in html
    assert "payment gateway timed out (call 2)" in html
    assert "Traceback (most recent call last)" in html
    assert "Attempt 3 succeeded" in html
    assert html.count("seg seg-failed") == 2  # on the waterfall too
    # The stored request, its credentials masked; the final response.
    assert "sk_secret_value" not in html
    assert "********" in html
    assert "&#34;R-B-9&#34;" in html  # the receipt step's output, as JSON
    assert '<span class="code-status c2xx">200</span>' in html
    # No polling script state for a finished run.
    assert 'data-terminal="true"' in html

    live = admin.get(f"/durable/runs/{run_id}/live")
    assert live.status_code == 200
    assert "<html" not in live.text and 'data-step="charge"' in live.text


def test_unknown_run_is_a_404_page(admin: FlaskClient) -> None:
    page = admin.get("/durable/runs/0123456789abcdef0123456789abcdef")
    assert page.status_code == 404
    assert page.mimetype == "text/html"
    assert "There is no run" in page.text
    assert admin.get("/durable/runs/nope/live").status_code == 404


def test_step_output_and_request_are_escaped(app: Flask, admin: FlaskClient) -> None:
    evil = '<script>alert("owned")</script><img src=x onerror=alert(1)>'
    run_id = start(admin, "/echo", data=evil, content_type="text/plain")
    wait_status(app, run_id, "completed")
    html = admin.get(f"/durable/runs/{run_id}").text
    assert "<script>alert" not in html
    assert "<img src=x" not in html
    assert "&lt;script&gt;alert(&#34;owned&#34;)&lt;/script&gt;" in html
    # Once as the step's output, once in the request body, once in the
    # response body.
    assert html.count("&lt;img src=x onerror=alert(1)&gt;") == 3
    assert re.findall(r"<script\b[^>]*>", html) == [
        '<script src="/durable/static/dashboard.js" defer>'
    ]


# -- actions -------------------------------------------------------------------------


def test_post_without_csrf_token_is_refused(app: Flask, admin: FlaskClient) -> None:
    run_id = start(admin, "/broken")
    wait_status(app, run_id, "failed")
    FIXED["charge"] = True
    GATE.set()

    no_token = admin.post(f"/durable/runs/{run_id}/retry")
    assert no_token.status_code == 403
    assert "CSRF" in no_token.get_json()["error"]
    wrong = admin.post(f"/durable/runs/{run_id}/retry", data={"csrf_token": "0" * 64})
    assert wrong.status_code == 403
    cross_site = admin.post(
        f"/durable/runs/{run_id}/retry",
        data={"csrf_token": csrf_of(admin.get("/durable/").text)},
        headers={"Sec-Fetch-Site": "cross-site"},
    )
    assert cross_site.status_code == 403
    wait_status(app, run_id, "failed", timeout=1)  # nothing was done

    token = csrf_of(admin.get(f"/durable/runs/{run_id}").text)
    done = admin.post(f"/durable/runs/{run_id}/retry", data={"csrf_token": token})
    assert done.status_code == 303
    assert done.headers["Location"] == f"/durable/runs/{run_id}?done=retry"
    wait_status(app, run_id, "completed")
    page = admin.get(done.headers["Location"]).text
    assert "Retry scheduled" in page


def test_actions_show_refusals(app: Flask, admin: FlaskClient) -> None:
    run_id = start(admin, "/three")
    wait_status(app, run_id, "completed")
    token = csrf_of(admin.get(f"/durable/runs/{run_id}").text)
    form = {"csrf_token": token}

    retry = admin.post(f"/durable/runs/{run_id}/retry", data=form)
    assert retry.status_code == 409
    assert "completed, not failed" in retry.text and 'role="alert"' in retry.text
    cancel = admin.post(f"/durable/runs/{run_id}/cancel", data=form)
    assert cancel.status_code == 409
    assert "has already finished" in cancel.text
    rewind = admin.post(f"/durable/runs/{run_id}/rewind", data={**form, "step": "z"})
    assert rewind.status_code == 409
    assert "has no step &#39;z&#39;" in rewind.text
    event = admin.post(
        "/durable/send-event",
        data={**form, "run": run_id, "name": "x", "data": "{not json"},
    )
    assert event.status_code == 400
    assert "must be JSON" in event.text
    assert "{not json</textarea>" in event.text  # what was typed is kept
    unknown = admin.post("/durable/runs/" + "0" * 32 + "/retry", data=form)
    assert unknown.status_code == 404


def test_actions_cancel_rewind_and_send_event(app: Flask, admin: FlaskClient) -> None:
    napping = start(admin, "/nap")
    waiting = start(admin, "/approve")
    done = start(admin, "/three")
    wait_status(app, napping, "sleeping")
    wait_status(app, waiting, "waiting")
    token = csrf_of(admin.get("/durable/").text)

    cancel = admin.post(f"/durable/runs/{napping}/cancel", data={"csrf_token": token})
    assert cancel.status_code == 303
    wait_status(app, napping, "cancelled")

    event = admin.post(
        "/durable/send-event",
        data={
            "csrf_token": token,
            "run": waiting,
            "name": "order.approved",
            "data": '{"by": "ops"}',
        },
    )
    assert event.status_code == 303
    assert event.headers["Location"] == f"/durable/runs/{waiting}?done=event"
    info = wait_status(app, waiting, "completed")
    assert info.response[2] == b'{"approved":{"by":"ops"}}\n'

    rewind = admin.post(
        f"/durable/runs/{done}/rewind", data={"csrf_token": token, "step": "b"}
    )
    assert rewind.status_code == 303
    info = wait_status(app, done, "completed")
    assert [s.output for s in info.steps] == [1, 2, 2]
    assert calls["a"] == 1


def test_store_unavailable_is_a_503_page(
    app: Flask, admin: FlaskClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    import sqlalchemy as sa

    def locked(*args: Any) -> Any:
        raise sa.exc.OperationalError("SELECT", {}, Exception("database is locked"))

    monkeypatch.setattr(app.extensions["durable"], "list_runs", locked)
    page = admin.get("/durable/")
    assert page.status_code == 503
    assert page.headers["Retry-After"] == "2"
    assert "The durable store is unavailable" in page.text
