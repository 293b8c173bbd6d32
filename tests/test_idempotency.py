"""Idempotency-Key: one key, one run."""

from __future__ import annotations

import threading
import time
from collections import Counter
from typing import Any

import pytest
from flask import Flask, jsonify, request

from flask_durable import Durable, step

durable = Durable()


@pytest.fixture
def db_url(any_db_url: str) -> str:
    return any_db_url


def build(make_app: Any, **config: Any) -> tuple[Flask, Counter[str]]:
    app = make_app(**config)
    calls: Counter[str] = Counter()
    gate = threading.Event()
    app.config["gate"] = gate

    @app.post("/pay")
    @durable.endpoint
    def pay() -> Any:
        amount = request.get_json()["amount"]
        charge = step.run("charge", lambda: calls.update(["charge"]) or amount)
        if request.args.get("slow"):
            step.run("slow", gate.wait, 10)
        return jsonify(charged=charge, n=calls["charge"])

    @app.post("/nap")
    @durable.endpoint
    def nap() -> Any:
        step.sleep("nap", "1s")
        return jsonify(done=True)

    return app, calls


def test_repeat_gets_the_stored_response(make_app: Any, live_server: Any) -> None:
    app, calls = build(make_app)
    server = live_server(app)
    headers = {"Idempotency-Key": "order-1"}
    first = server.post("/pay", json={"amount": 5}, headers=headers)
    again = server.post("/pay", json={"amount": 5}, headers=headers)
    assert first.status_code == again.status_code == 200
    assert first.json() == again.json() == {"charged": 5, "n": 1}
    assert first.headers["Durable-Run-Id"] == again.headers["Durable-Run-Id"]
    assert calls["charge"] == 1
    other = server.post(
        "/pay", json={"amount": 5}, headers={"Idempotency-Key": "order-2"}
    )
    assert other.headers["Durable-Run-Id"] != first.headers["Durable-Run-Id"]
    assert calls["charge"] == 2


def test_same_key_different_request_is_422(make_app: Any, live_server: Any) -> None:
    app, calls = build(make_app)
    server = live_server(app)
    headers = {"Idempotency-Key": "k"}
    server.post("/pay", json={"amount": 5}, headers=headers)
    for kwargs in (
        {"json": {"amount": 6}},
        {"json": {"amount": 5}, "params": {"x": "1"}},
    ):
        r = server.post("/pay", headers=headers, **kwargs)
        assert r.status_code == 422
        assert "different request" in r.json()["error"]
    assert calls["charge"] == 1


def test_repeat_of_unfinished_run_redirects_to_its_wait_url(
    make_app: Any, live_server: Any
) -> None:
    app, _ = build(make_app)
    server = live_server(app)
    headers = {"Idempotency-Key": "sleepy"}
    first = server.post("/nap", headers=headers, allow_redirects=False)
    again = server.post("/nap", headers=headers, allow_redirects=False)
    assert first.status_code == again.status_code == 303
    assert first.headers["Location"] == again.headers["Location"]
    assert server.post("/nap", headers=headers).json() == {"done": True}


def test_concurrent_repeat_while_executing(make_app: Any, live_server: Any) -> None:
    app, calls = build(make_app)
    server = live_server(app)
    headers = {"Idempotency-Key": "busy"}
    out: dict[str, Any] = {}
    t = threading.Thread(
        target=lambda: out.update(
            r=server.post("/pay?slow=1", json={"amount": 1}, headers=headers)
        )
    )
    t.start()
    for _ in range(100):
        if calls["charge"]:
            break
        time.sleep(0.05)
    again = server.post(
        "/pay?slow=1", json={"amount": 1}, headers=headers, allow_redirects=False
    )
    assert again.status_code == 303
    app.config["gate"].set()
    t.join(10)
    assert out["r"].json() == {"charged": 1, "n": 1}
    assert server.get(again.headers["Location"]).json() == {"charged": 1, "n": 1}
    assert calls["charge"] == 1


def test_key_expires_after_ttl(make_app: Any, live_server: Any) -> None:
    app, calls = build(make_app, DURABLE_IDEMPOTENCY_TTL=0.5)
    server = live_server(app)
    headers = {"Idempotency-Key": "short"}
    first = server.post("/pay", json={"amount": 2}, headers=headers)
    time.sleep(0.7)
    second = server.post("/pay", json={"amount": 3}, headers=headers)
    assert second.status_code == 200
    assert second.headers["Durable-Run-Id"] != first.headers["Durable-Run-Id"]
    assert calls["charge"] == 2


def test_bad_keys_are_400(make_app: Any, live_server: Any) -> None:
    app, calls = build(make_app)
    server = live_server(app)
    r = server.post("/pay", json={"amount": 1}, headers={"Idempotency-Key": "x" * 300})
    assert r.status_code == 400
    assert "Idempotency-Key" in r.json()["error"]
    assert calls["charge"] == 0
