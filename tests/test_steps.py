"""Steps over real HTTP: the happy path, retries from the point of failure,
failures, request bodies kept for replay, repeated step ids; steps used
outside a durable view."""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest
from steps_app import build, durable

from flask_durable import current_run, current_step, step
from flask_durable.errors import RetryAfterError, StepError


@pytest.fixture
def db_url(any_db_url: str) -> str:
    """Every test here runs on SQLite and on PostgreSQL."""
    return any_db_url


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


def test_step_outside_a_durable_view_is_runtime_error() -> None:
    with pytest.raises(RuntimeError, match="@durable.endpoint"):
        step.run("x", lambda: 1)
    with pytest.raises(RuntimeError):
        step.sleep("x", "1s")
    with pytest.raises(RuntimeError):
        step.wait_for_event("x", event="e", timeout="1s")
    with pytest.raises(RuntimeError):
        step.parallel(lambda: 1)
    with pytest.raises(RuntimeError, match="current_run"):
        current_run.id  # noqa: B018
    with pytest.raises(RuntimeError, match="current_step"):
        current_step.id  # noqa: B018


def test_retry_after_error_keeps_its_message() -> None:
    e = RetryAfterError("slow down", "30s")
    assert str(e) == "slow down"
    assert e.retry_after == "30s"
    err = StepError("s", "KeyError", "k")
    assert (err.step_id, err.error_type, err.error_message) == ("s", "KeyError", "k")
    assert "KeyError" in str(err)
