"""Replay goes through the app exactly like the original request: hooks,
error handlers, url_for, host checks; RetryAfterError timing;
``durable.is_replay()``, which a client cannot fake."""

from __future__ import annotations

import time
from collections import Counter
from typing import Any

from flask import Flask, g, jsonify, request, url_for

from flask_durable import Durable, RetryAfterError, StepError, current_run, step

durable = Durable()


def build(make_app: Any, **config: Any) -> tuple[Flask, Counter[str]]:
    app = make_app(**config)
    calls: Counter[str] = Counter()

    def fail_first(name: str, error: Exception) -> str:
        calls[name] += 1
        if calls[name] == 1:
            raise error
        return name

    @app.before_request
    def hook() -> None:
        calls["before_request"] += 1
        g.seen_replay = durable.is_replay()

    @app.after_request
    def stamp(response: Any) -> Any:
        response.headers["X-After"] = "yes"
        return response

    @app.errorhandler(StepError)
    def step_failed(e: StepError) -> Any:
        return jsonify(failed=e.step_id, type=e.error_type), 502

    @app.post("/links")
    @durable.endpoint
    def links() -> Any:
        step.run("flaky", fail_first, "links", OSError("down"))
        return jsonify(
            url=url_for("links", _external=True),
            host=request.host,
            replay=g.seen_replay,
            attempt=current_run.attempt,
        )

    @app.post("/later")
    @durable.endpoint
    def later() -> Any:
        began = step.run("began", time.time)
        step.run("slow", fail_first, "later", RetryAfterError("busy", "1s"))
        return jsonify(waited=time.time() - began)

    @app.post("/broken")
    @durable.endpoint(retries=1)
    def broken() -> Any:
        step.run("never", lambda: (_ for _ in ()).throw(KeyError("gone")))
        return "no"

    return app, calls


def test_replay_keeps_host_hooks_and_url_for(make_app: Any, live_server: Any) -> None:
    app, calls = build(make_app, TRUSTED_HOSTS=["shop.example:8443", "127.0.0.1"])
    server = live_server(app)
    r = server.post(
        "/links", headers={"Host": "shop.example:8443"}, allow_redirects=False
    )
    assert r.status_code == 303
    final = server.get(r.headers["Location"], headers={"Host": "shop.example:8443"})
    assert final.status_code == 200
    assert final.json() == {
        "url": "http://shop.example:8443/links",
        "host": "shop.example:8443",
        "replay": True,
        "attempt": 1,
    }
    assert final.headers["X-After"] == "yes"
    # The original request, its replay, and the wait request ran the hook.
    assert calls["before_request"] == 3


def test_retry_after_error_is_honoured(make_app: Any, live_server: Any) -> None:
    app, calls = build(make_app)
    server = live_server(app)
    r = server.post("/later")
    assert r.status_code == 200
    assert r.json()["waited"] >= 1.0
    assert calls["later"] == 2


def test_error_handler_renders_the_final_response(
    make_app: Any, live_server: Any
) -> None:
    app, _ = build(make_app)
    server = live_server(app)
    r = server.post("/broken")
    assert r.status_code == 502
    assert r.json() == {"failed": "never", "type": "KeyError"}
    assert r.headers["X-After"] == "yes"
    assert r.history and r.history[0].status_code == 303


def test_propagated_exceptions_still_store_a_500(
    make_app: Any, live_server: Any
) -> None:
    app, _ = build(make_app, PROPAGATE_EXCEPTIONS=True)
    del app.error_handler_spec[None][None][StepError]
    server = live_server(app)
    r = server.post("/broken", allow_redirects=False)
    assert r.status_code == 303
    final = server.get(r.headers["Location"])
    assert final.status_code == 500
    assert final.headers["Durable-Run-Id"] == r.headers["Durable-Run-Id"]
    with app.app_context():
        info = durable.get_run(r.headers["Durable-Run-Id"])
    assert info is not None and info.status == "failed"


def test_is_replay_false_on_first_request(make_app: Any) -> None:
    app = make_app()

    @app.get("/")
    @durable.endpoint
    def view() -> Any:
        return jsonify(replay=durable.is_replay(), attempt=current_run.attempt)

    assert app.test_client().get("/").json == {"replay": False, "attempt": 0}


def test_replay_marker_cannot_be_sent_by_a_client(make_app: Any) -> None:
    app = make_app()

    @app.get("/")
    @durable.endpoint
    def view() -> Any:
        return jsonify(replay=durable.is_replay())

    r = app.test_client().get(
        "/", headers={"Flask-Durable-Replay": "1", "X-Flask-Durable.Replay": "1"}
    )
    assert r.json == {"replay": False}
