"""The durable core over real HTTP: happy path, retries, failures, replay."""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest
import requests
from flask import Flask, jsonify, request

from flask_durable import (
    Durable,
    NonRetriableError,
    StepError,
    current_run,
    current_step,
    step,
)

durable = Durable()


@pytest.fixture
def db_url(any_db_url: str) -> str:
    """Every test here runs on SQLite and on PostgreSQL."""
    return any_db_url


def build(make_app: Any, **config: Any) -> tuple[Flask, Counter[str]]:
    app = make_app(**config)
    calls: Counter[str] = Counter()
    failures: dict[str, int] = {}
    ext = durable

    def flaky(name: str, times: int) -> str:
        calls[name] += 1
        left = failures.setdefault(name, times)
        if left > 0:
            failures[name] = left - 1
            raise ConnectionError(f"{name} down")
        return f"{name}-ok"

    @app.post("/three")
    @ext.endpoint
    def three() -> Any:
        a = step.run("a", lambda: calls.update(["a"]) or 1)
        b = step.run("b", lambda x: calls.update(["b"]) or x + 1, a)
        c = step.run("c", lambda x: calls.update(["c"]) or x * 10, b)
        return jsonify(a=a, b=b, c=c, replay=current_run.is_replay)

    @app.post("/retry")
    @ext.endpoint
    def retry() -> Any:
        first = step.run("first", lambda: calls.update(["first"]) or "one")
        second = step.run("second", flaky, "second", 2)
        return jsonify(first=first, second=second, attempt=current_run.attempt)

    @app.post("/fatal")
    @ext.endpoint
    def fatal() -> Any:
        def boom() -> None:
            calls["fatal"] += 1
            raise NonRetriableError("card declined")

        try:
            step.run("charge", boom)
        except StepError as e:
            return jsonify(step=e.step_id, type=e.error_type, msg=e.error_message), 402
        return "unreachable"

    @app.post("/exhaust")
    @ext.endpoint(retries=1)
    def exhaust() -> Any:
        step.run("always", flaky, "always", 100)
        return "unreachable"

    @app.route("/echo", methods=["POST", "PUT", "PATCH"])
    @ext.endpoint
    def echo() -> Any:
        step.run("fail-once", flaky, "echo", 1)
        return jsonify(
            method=request.method,
            body=request.get_data().hex(),
            form=request.form.to_dict(),
            query=request.args.to_dict(),
            ctype=request.content_type,
        )

    @app.get("/repeat")
    @ext.endpoint(id="repeat-endpoint")
    def repeat() -> Any:
        ids = [step.run("fetch", lambda: current_step.id) for _ in range(3)]
        keys = step.run("key", lambda: current_step.idempotency_key)
        return jsonify(ids=ids, key=keys, run=current_run.id)

    return app, calls


def test_three_steps_happy_path_no_redirect(make_app: Any, live_server: Any) -> None:
    app, calls = build(make_app)
    server = live_server(app)
    r = server.post("/three", allow_redirects=False)
    assert r.status_code == 200
    assert r.json() == {"a": 1, "b": 2, "c": 20, "replay": False}
    run_id = r.headers["Durable-Run-Id"]
    assert calls == Counter(a=1, b=1, c=1)
    with app.app_context():
        info = durable.get_run(run_id)
    assert info is not None
    assert info.status == "completed"
    assert [s.id for s in info.steps] == ["a", "b", "c"]
    assert [s.output for s in info.steps] == [1, 2, 20]
    assert info.response is not None and info.response[0] == 200


def test_failing_step_retried_from_point_of_failure(
    make_app: Any, live_server: Any
) -> None:
    app, calls = build(make_app)
    server = live_server(app)
    r = server.post("/retry", allow_redirects=False)
    assert r.status_code == 303
    location = r.headers["Location"]
    assert location.startswith("/durable/wait/")
    assert r.json()["status"] == "scheduled"
    run_id = r.headers["Durable-Run-Id"]
    final = server.get(location)
    assert final.status_code == 200, final.text
    assert final.json() == {"first": "one", "second": "second-ok", "attempt": 2}
    assert final.headers["Durable-Run-Id"] == run_id
    assert calls["first"] == 1
    assert calls["second"] == 3


def test_redirect_following_client_gets_final_response(
    make_app: Any, live_server: Any
) -> None:
    app, calls = build(make_app)
    server = live_server(app)
    r = server.post("/retry")
    assert r.status_code == 200
    assert r.json()["second"] == "second-ok"
    assert r.history and r.history[0].status_code == 303


def test_prefer_respond_async(make_app: Any, live_server: Any) -> None:
    app, _ = build(make_app)
    server = live_server(app)
    r = server.post(
        "/retry", headers={"Prefer": "respond-async"}, allow_redirects=False
    )
    assert r.status_code == 202
    body = r.json()
    assert body["run_id"] == r.headers["Durable-Run-Id"]
    assert body["wait_url"] == r.headers["Location"]
    assert server.get(body["wait_url"]).json()["second"] == "second-ok"


def test_non_retriable_raises_step_error_at_once(
    make_app: Any, live_server: Any
) -> None:
    app, calls = build(make_app)
    server = live_server(app)
    r = server.post("/fatal", allow_redirects=False)
    assert r.status_code == 402
    assert r.json() == {
        "step": "charge",
        "type": "NonRetriableError",
        "msg": "card declined",
    }
    assert calls["fatal"] == 1


def test_exhausted_retries_fail_the_run_with_500(
    make_app: Any, live_server: Any
) -> None:
    app, calls = build(make_app)
    server = live_server(app)
    r = server.post("/exhaust")
    assert r.status_code == 500
    assert calls["always"] == 2
    run_id = r.headers["Durable-Run-Id"]
    with app.app_context():
        info = durable.get_run(run_id)
    assert info is not None
    assert info.status == "failed"
    assert info.steps[0].status == "failed"
    assert info.steps[0].attempts == 2
    assert info.steps[0].error == {"type": "ConnectionError", "message": "always down"}


def test_bodies_replayed_byte_for_byte(make_app: Any, live_server: Any) -> None:
    app, _ = build(make_app)
    server = live_server(app)
    raw = bytes(range(256)) * 3
    r = server.request(
        "PUT",
        "/echo?x=1&y=%20z",
        data=raw,
        headers={"Content-Type": "application/octet-stream"},
    )
    assert r.status_code == 200
    assert bytes.fromhex(r.json()["body"]) == raw
    assert r.json()["query"] == {"x": "1", "y": " z"}
    assert r.json()["method"] == "PUT"

    r = server.request("PATCH", "/echo", data={"name": "Zoë", "n": "2"})
    assert r.json()["form"] == {"name": "Zoë", "n": "2"}
    assert r.json()["method"] == "PATCH"

    r = server.post("/echo", json={"flight": "LH 123"})
    assert bytes.fromhex(r.json()["body"]) == b'{"flight": "LH 123"}'
    assert r.json()["ctype"] == "application/json"


def test_body_over_limit_is_413_before_any_step(
    make_app: Any, live_server: Any
) -> None:
    app, calls = build(make_app, DURABLE_MAX_REQUEST_BODY=1000)
    server = live_server(app)
    r = server.post("/echo", data=b"x" * 1001)
    assert r.status_code == 413
    assert "DURABLE_MAX_REQUEST_BODY" in r.json()["detail"]
    assert calls["echo"] == 0
    assert server.post("/echo", data=b"x" * 1000).status_code == 200


def test_chunked_body_is_stored_and_replayed(make_app: Any, live_server: Any) -> None:
    app, calls = build(make_app)
    server = live_server(app)
    chunks = [b"first chunk,", b"second chunk"]
    # A generator body goes out with Transfer-Encoding: chunked and no
    # Content-Length; the step fails once, so the answer comes from a replay
    # of the stored request.
    r = server.post("/echo", data=iter(chunks))
    assert r.status_code == 200
    assert r.history[0].status_code == 303
    assert bytes.fromhex(r.json()["body"]) == b"".join(chunks)
    assert calls["echo"] == 2


def test_repeated_ids_get_their_own_step(make_app: Any, live_server: Any) -> None:
    app, _ = build(make_app)
    server = live_server(app)
    r = server.get("/repeat")
    body = r.json()
    assert body["ids"] == ["fetch", "fetch:1", "fetch:2"]
    assert body["key"] == f"{body['run']}:key"


def test_tampered_and_unknown_tokens_are_404_json(
    make_app: Any, live_server: Any
) -> None:
    app, _ = build(make_app)
    server = live_server(app)
    r = server.post("/retry", allow_redirects=False)
    location = r.headers["Location"]
    tampered = location[:-3] + ("aaa" if not location.endswith("aaa") else "bbb")
    for url in (tampered, "/durable/wait/nope", "/durable/wait/" + "x" * 500):
        bad = server.get(url)
        assert bad.status_code == 404
        assert bad.headers["Content-Type"] == "application/json"
        assert "error" in bad.json()
    server.get(location)


def test_wait_url_redirects_to_itself_while_running(
    make_app: Any, live_server: Any
) -> None:
    app, _ = build(
        make_app,
        DURABLE_WAIT_TIMEOUT=0.3,
        DURABLE_RETRY_BACKOFF=3,
        DURABLE_RETRY_BACKOFF_MAX=3,
    )
    server = live_server(app)
    r = server.post("/retry", allow_redirects=False)
    location = r.headers["Location"]
    again = server.get(location, allow_redirects=False)
    assert again.status_code == 303
    assert again.headers["Location"] == location
    polled = server.get(
        location, headers={"Prefer": "respond-async"}, allow_redirects=False
    )
    assert polled.status_code == 202
    assert polled.headers["Retry-After"]
    assert polled.json()["status"] in ("scheduled", "running")


def test_requests_session_follows_to_the_end(make_app: Any, live_server: Any) -> None:
    app, _ = build(make_app)
    server = live_server(app)
    with requests.Session() as s:
        r = s.post(server.url + "/retry", timeout=30)
    assert r.status_code == 200
