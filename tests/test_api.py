"""The JSON API under ``<prefix>/api/``: access rule, CSRF, reading and
steering runs over real HTTP, on SQLite and PostgreSQL."""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from typing import Any

import pytest
import requests
from flask import Flask, jsonify, request

from flask_durable import Durable, step

durable = Durable()

#: Whether step "two" of /flow works (it fails for good until then).
FIXED = {"two": False}
calls: Counter[str] = Counter()


@pytest.fixture
def db_url(any_db_url: str) -> str:
    return any_db_url


@pytest.fixture(autouse=True)
def _reset() -> Any:
    FIXED["two"] = False
    calls.clear()
    yield
    durable._access.auth = None


def _count(name: str) -> str:
    calls[name] += 1
    return name


def _two() -> str:
    calls["two"] += 1
    if not FIXED["two"]:
        raise RuntimeError("step two is broken <b>")
    return "two"


def build(make_app: Any, **config: Any) -> Flask:
    app = make_app(durable, **config)

    @app.post("/flow")
    @durable.endpoint(retries=1)
    def flow() -> Any:
        a = step.run("one", _count, "one")
        b = step.run("two", _two)
        c = step.run("three", _count, "three")
        return jsonify(a=a, b=b, c=c)

    @app.post("/nap")
    @durable.endpoint
    def nap() -> Any:
        step.run("start", _count, "start")
        step.sleep("nap", "30s")
        return jsonify(ok=True)

    @app.post("/approve")
    @durable.endpoint
    def approve() -> Any:
        event = step.wait_for_event("ok", event="order/approved", timeout="1h")
        return jsonify(event=event and event["data"])

    return app


def admin_only() -> bool:
    return request.headers.get("X-Admin") == "yes"


class Api:
    """A client of the API: a session holding the CSRF cookie and token."""

    def __init__(self, server: Any, headers: dict[str, str] | None = None) -> None:
        self.server = server
        self.session = requests.Session()
        self.session.headers.update(headers or {"X-Admin": "yes"})
        self.base = server.url + "/durable/api"
        token = self.session.get(self.base + "/csrf", timeout=10)
        assert token.status_code == 200, token.text
        self.session.headers["X-CSRF-Token"] = token.json()["csrf_token"]

    def get(self, path: str, **kw: Any) -> requests.Response:
        return self.session.get(self.base + path, timeout=30, **kw)

    def post(self, path: str, **kw: Any) -> requests.Response:
        return self.session.post(self.base + path, timeout=30, **kw)


def wait_status(api: Api, run_id: str, status: str, timeout: float = 15) -> Any:
    end = time.monotonic() + timeout
    while True:
        run = api.get(f"/runs/{run_id}").json()
        if run["status"] == status:
            return run
        assert time.monotonic() < end, f"run {run_id} is {run['status']}"
        time.sleep(0.05)


# -- access ---------------------------------------------------------------------


def test_closed_without_auth_outside_debug(make_app: Any, live_server: Any) -> None:
    server = live_server(build(make_app))
    for path in ("/durable/api/runs", "/durable/api/openapi.json", "/durable/"):
        r = server.get(path)
        assert r.status_code == 403, path
        assert "dashboard_auth" in r.json()["error"]
    r = server.post("/durable/api/runs/x/retry")
    assert r.status_code == 403


def test_open_in_debug_mode(make_app: Any) -> None:
    app = build(make_app)
    app.debug = True
    assert app.test_client().get("/durable/api/runs").status_code == 200


def test_auth_callback_decides(make_app: Any, live_server: Any) -> None:
    server = live_server(build(make_app))
    durable.dashboard_auth(admin_only)
    assert server.get("/durable/api/runs").status_code == 403
    r = server.get("/durable/api/runs", headers={"X-Admin": "yes"})
    assert r.status_code == 200 and r.json() == {"runs": [], "next_cursor": None}

    def broken() -> bool:
        raise LookupError("no user")

    durable.dashboard_auth(broken)
    r = server.get("/durable/api/runs", headers={"X-Admin": "yes"})
    assert r.status_code == 403
    durable.dashboard_auth(lambda: "yes")  # type: ignore[arg-type,return-value]
    assert server.get("/durable/api/runs").status_code == 403  # only True allows


def test_dashboard_off(make_app: Any) -> None:
    app = build(make_app, DURABLE_DASHBOARD=False)
    app.debug = True
    assert app.test_client().get("/durable/api/runs").status_code == 404


def test_csrf(make_app: Any, live_server: Any) -> None:
    server = live_server(build(make_app))
    durable.dashboard_auth(admin_only)
    run_id = server.post("/nap", allow_redirects=False).headers["Durable-Run-Id"]
    api = Api(server)
    token = api.session.headers.pop("X-CSRF-Token")
    admin = {"X-Admin": "yes"}
    cancel = f"{api.base}/runs/{run_id}/cancel"

    # No token, a wrong one, one without its cookie, a cross-site request.
    assert api.post(f"/runs/{run_id}/cancel").status_code == 403
    r = api.post(f"/runs/{run_id}/cancel", headers={"X-CSRF-Token": "0" * 64})
    assert r.status_code == 403 and "CSRF" in r.json()["error"]
    r = requests.post(cancel, headers={**admin, "X-CSRF-Token": token}, timeout=10)
    assert r.status_code == 403
    r = api.post(
        f"/runs/{run_id}/cancel",
        headers={"X-CSRF-Token": token, "Sec-Fetch-Site": "cross-site"},
    )
    assert r.status_code == 403
    assert wait_status(api, run_id, "sleeping")

    # A form field works as well as the header; then the run is cancelled.
    r = api.post(f"/runs/{run_id}/cancel", data={"csrf_token": token})
    assert r.status_code == 202, r.text
    assert wait_status(api, run_id, "cancelled")


# -- reading and steering ----------------------------------------------------------


def test_retry_rewind_and_wait_url(make_app: Any, live_server: Any) -> None:
    server = live_server(build(make_app))
    durable.dashboard_auth(admin_only)
    api = Api(server)
    r = server.post("/flow", allow_redirects=False, headers={"Authorization": "t0p"})
    run_id, wait_url = r.headers["Durable-Run-Id"], r.headers["Location"]
    assert server.get(wait_url, headers={"Authorization": "t0p"}).status_code == 500
    run = wait_status(api, run_id, "failed")

    steps = {s["id"]: s for s in run["steps"]}
    assert steps["two"]["status"] == "failed"
    errors = steps["two"]["attempt_errors"]
    assert [e["attempt"] for e in errors] == [0, 1]
    assert errors[0]["type"] == "RuntimeError"
    assert "step two is broken" in errors[0]["message"]
    assert "Traceback" in errors[0]["traceback"] and "_two" in errors[0]["traceback"]
    assert run["request"]["method"] == "POST" and run["request"]["path"] == "/flow"
    headers = dict(run["request"]["headers"])
    assert headers["Authorization"] == "********"
    assert "t0p" not in json.dumps(run)
    assert run["response"]["status"] == 500

    # A run that is not failed cannot be retried; unknown runs are 404.
    assert api.post("/runs/" + "0" * 32 + "/retry").status_code == 404
    FIXED["two"] = True
    assert api.post(f"/runs/{run_id}/retry").status_code == 202
    final = server.get(wait_url, headers={"Authorization": "t0p"})
    assert final.status_code == 200 and final.json()["b"] == "two"
    assert calls == {"one": 1, "two": 3, "three": 1}
    r = api.post(f"/runs/{run_id}/retry")
    assert r.status_code == 409 and "not failed" in r.json()["error"]

    # Rewind: bad bodies, an unknown step, then a real rewind.
    assert api.post(f"/runs/{run_id}/rewind", json={}).status_code == 400
    assert api.post(f"/runs/{run_id}/rewind", data="{").status_code == 400
    r = api.post(f"/runs/{run_id}/rewind", json={"step": "nope"})
    assert r.status_code == 409 and "no step" in r.json()["error"]
    assert api.post(f"/runs/{run_id}/rewind", json={"step": "three"}).status_code == 202
    again = server.get(wait_url, headers={"Authorization": "t0p"})
    assert again.status_code == 200
    assert calls == {"one": 1, "two": 3, "three": 2}


def test_list_filters_search_and_pages(make_app: Any, live_server: Any) -> None:
    server = live_server(build(make_app))
    durable.dashboard_auth(admin_only)
    api = Api(server)
    naps = [
        server.post(
            "/nap", allow_redirects=False, headers={"Idempotency-Key": f"k{i}"}
        ).headers["Durable-Run-Id"]
        for i in range(5)
    ]
    FIXED["two"] = True
    flow = server.post("/flow").headers["Durable-Run-Id"]

    everything = api.get("/runs").json()
    assert [r["id"] for r in everything["runs"]] == sorted([*naps, flow], reverse=True)
    pages, cursor, seen = 0, None, []
    while True:
        params: dict[str, Any] = {"limit": 2}
        if cursor:
            params["cursor"] = cursor
        page = api.get("/runs", params=params).json()
        pages += 1
        seen += [r["id"] for r in page["runs"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert pages == 3 and seen == [r["id"] for r in everything["runs"]]
    assert [r["id"] for r in api.get("/runs?status=completed").json()["runs"]] == [flow]
    assert len(api.get("/runs?endpoint=nap").json()["runs"]) == 5
    found = api.get("/runs?q=k3").json()["runs"]
    assert [r["id"] for r in found] == [naps[3]]
    assert [r["id"] for r in api.get(f"/runs?q={flow}").json()["runs"]] == [flow]

    for bad in ("status=bogus", "limit=0", "limit=x", "cursor=%00", "nope=1"):
        r = api.get("/runs?" + bad)
        assert r.status_code == 400, bad
        assert r.json()["error"]
    assert api.get("/runs/" + "f" * 32).status_code == 404


def test_cancel_and_events(make_app: Any, live_server: Any) -> None:
    server = live_server(build(make_app))
    durable.dashboard_auth(admin_only)
    api = Api(server)
    nap = server.post("/nap", allow_redirects=False).headers["Durable-Run-Id"]
    wait_status(api, nap, "sleeping")
    assert api.post(f"/runs/{nap}/cancel").status_code == 202
    wait_status(api, nap, "cancelled")
    r = api.post(f"/runs/{nap}/cancel")
    assert r.status_code == 409 and "finished" in r.json()["error"]
    assert api.post("/runs/" + "0" * 32 + "/cancel").status_code == 404

    r = server.post("/approve", allow_redirects=False)
    run_id, wait_url = r.headers["Durable-Run-Id"], r.headers["Location"]
    wait_status(api, run_id, "waiting")
    assert api.post("/events", json={"name": ""}).status_code == 400
    assert api.post("/events", json=[]).status_code == 400
    r = api.post("/events", json={"name": "order/approved", "data": {"by": "ann"}})
    assert r.status_code == 202 and len(r.json()["ids"]) == 1
    assert server.get(wait_url).json() == {"event": {"by": "ann"}}


def test_openapi_document(make_app: Any, live_server: Any) -> None:
    server = live_server(build(make_app))
    durable.dashboard_auth(admin_only)
    api = Api(server)
    doc = api.get("/openapi.json").json()
    assert doc["openapi"] == "3.1.0"
    assert doc["servers"] == [{"url": "/durable/api"}]
    assert set(doc["paths"]) == {
        "/runs",
        "/runs/{run_id}",
        "/runs/{run_id}/retry",
        "/runs/{run_id}/cancel",
        "/runs/{run_id}/rewind",
        "/events",
        "/flow",
        "/csrf",
        "/openapi.json",
    }
    # Every route of the blueprint is in the document.
    rules = {
        r.rule.removeprefix("/durable/api").replace("<run_id>", "{run_id}")
        for r in server.app.url_map.iter_rules()
        if r.endpoint.startswith("durable_api.")
    }
    assert rules == set(doc["paths"])
    from openapi_spec_validator import validate

    validate(doc)


def test_cancel_while_executing_over_api(make_app: Any, live_server: Any) -> None:
    app = build(make_app)
    gate = threading.Event()

    @app.post("/held")
    @durable.endpoint
    def held() -> Any:
        step.run("first", _count, "first")
        step.run("wait", gate.wait, 10)
        step.run("after", _count, "after")
        return jsonify(ok=True)

    server = live_server(app)
    durable.dashboard_auth(admin_only)
    api = Api(server)
    result: dict[str, Any] = {}
    client = threading.Thread(target=lambda: result.update(r=server.post("/held")))
    client.start()
    try:
        end = time.monotonic() + 10
        while not app.extensions["durable"].active:
            assert time.monotonic() < end
            time.sleep(0.02)
        run_id = next(iter(app.extensions["durable"].active))
        r = api.post(f"/runs/{run_id}/rewind", json={"step": "first"})
        assert r.status_code == 409 and "executing" in r.json()["error"]
        assert api.post(f"/runs/{run_id}/cancel").status_code == 202
    finally:
        gate.set()
        client.join(10)
    assert result["r"].status_code == 409
    assert calls["after"] == 0


def test_final_response_credentials_are_masked(make_app: Any, live_server: Any) -> None:
    app = build(make_app, DURABLE_SENSITIVE_HEADERS=["X-Api-Token"])

    @app.post("/login")
    @durable.endpoint
    def login() -> Any:
        step.run("check", _count, "check")
        response = jsonify(ok=True)
        response.set_cookie("session", "s3cr3t-cookie")
        response.headers["X-Api-Token"] = "t0ken-value"
        return response

    server = live_server(app)
    durable.dashboard_auth(admin_only)
    run_id = server.post("/login").headers["Durable-Run-Id"]
    run = Api(server).get(f"/runs/{run_id}").json()
    headers = dict(run["response"]["headers"])
    assert headers["Set-Cookie"] == "********"
    assert headers["X-Api-Token"] == "********"
    assert "s3cr3t" not in json.dumps(run) and "t0ken" not in json.dumps(run)
