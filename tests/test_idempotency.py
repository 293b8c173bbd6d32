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


# -- keys are scoped per caller (SPEC 7) --------------------------------------


def build_callers(make_app: Any, **config: Any) -> tuple[Flask, Counter[str]]:
    """An endpoint answering with who called it, and a cookie for them."""
    app = make_app(**config)
    calls: Counter[str] = Counter()
    gate = threading.Event()
    app.config["gate"] = gate

    @app.post("/me")
    @durable.endpoint
    def me() -> Any:
        who = request.headers.get("Authorization") or request.headers.get(
            "Cookie", "anonymous"
        )
        step.run("charge", lambda: calls.update([who]))
        if request.args.get("slow"):
            step.run("slow", gate.wait, 10)
        response = jsonify(who=who, amount=request.get_json()["amount"])
        response.set_cookie("session", who.replace(" ", "-").replace("=", "-"))
        return response

    return app, calls


def test_same_key_from_other_callers_gets_their_own_runs(
    make_app: Any, live_server: Any
) -> None:
    app, calls = build_callers(make_app)
    server = live_server(app)
    runs = {}
    for who in ("Bearer alice", "Bearer bob"):
        headers = {"Idempotency-Key": "shared", "Authorization": who}
        r = server.post("/me", json={"amount": 5}, headers=headers)
        assert r.status_code == 200
        assert r.json() == {"who": who, "amount": 5}
        assert r.cookies["session"] == who.replace(" ", "-")
        runs[who] = r.headers["Durable-Run-Id"]
    # Cookies are credentials too; no credentials is one more scope.
    for cookie in ("sid=1", "sid=2", None):
        headers = {"Idempotency-Key": "shared"}
        if cookie:
            headers["Cookie"] = cookie
        r = server.post("/me", json={"amount": 5}, headers=headers)
        assert r.status_code == 200
        assert r.json()["who"] == (cookie or "anonymous")
        runs[cookie or "anonymous"] = r.headers["Durable-Run-Id"]
    assert len(set(runs.values())) == 5
    assert set(calls.values()) == {1} and len(calls) == 5

    # Each caller repeating its key gets its own stored response.
    for who in ("Bearer alice", "Bearer bob"):
        headers = {"Idempotency-Key": "shared", "Authorization": who}
        again = server.post("/me", json={"amount": 5}, headers=headers)
        assert again.status_code == 200
        assert again.json() == {"who": who, "amount": 5}
        assert again.cookies["session"] == who.replace(" ", "-")
        assert again.headers["Durable-Run-Id"] == runs[who]
    anon = server.post("/me", json={"amount": 5}, headers={"Idempotency-Key": "shared"})
    assert anon.headers["Durable-Run-Id"] == runs["anonymous"]
    assert set(calls.values()) == {1}


def test_another_callers_key_neither_blocks_nor_conflicts(
    make_app: Any, live_server: Any
) -> None:
    app, calls = build_callers(make_app)
    server = live_server(app)
    alice = {"Idempotency-Key": "k", "Authorization": "Bearer alice"}
    bob = {"Idempotency-Key": "k", "Authorization": "Bearer bob"}
    out: dict[str, Any] = {}
    t = threading.Thread(
        target=lambda: out.update(
            r=server.post("/me?slow=1", json={"amount": 1}, headers=alice)
        )
    )
    t.start()
    try:
        for _ in range(100):
            if calls["Bearer alice"]:
                break
            time.sleep(0.02)
        # Alice's run is in progress: Bob is neither sent to its wait URL
        # nor refused, with the same body or another one.
        # Bob's run holds on the gate too: from a thread, so that the gate
        # opens for both (rather than after his view's 10 s wait).
        bob_thread = threading.Thread(
            target=lambda: out.update(
                same=server.post(
                    "/me?slow=1",
                    json={"amount": 1},
                    headers=bob,
                    allow_redirects=False,
                )
            )
        )
        bob_thread.start()
        for _ in range(100):
            if calls["Bearer bob"]:
                break
            time.sleep(0.02)
        other = server.post(
            "/me", json={"amount": 2}, headers={**bob, "Idempotency-Key": "k2"}
        )
        claimed = server.post(
            "/me",
            json={"amount": 9},
            headers={"Idempotency-Key": "k3", "Authorization": "Bearer mallory"},
        )
        assert claimed.status_code == 200
        theirs = server.post(
            "/me", json={"amount": 3}, headers={**alice, "Idempotency-Key": "k3"}
        )
    finally:
        app.config["gate"].set()
        t.join(10)
        bob_thread.join(10)
    same = out["same"]
    assert same.status_code == 200, same.headers
    assert same.json() == {"who": "Bearer bob", "amount": 1}
    assert other.status_code == 200
    # Mallory used k3 first: Alice's own k3 is still hers (no 422).
    assert theirs.status_code == 200
    assert theirs.json() == {"who": "Bearer alice", "amount": 3}
    assert out["r"].json() == {"who": "Bearer alice", "amount": 1}
    assert (
        len({same.headers["Durable-Run-Id"], out["r"].headers["Durable-Run-Id"]}) == 2
    )
    # The same caller with another body under its key is still refused.
    mine = server.post("/me", json={"amount": 7}, headers=alice)
    assert mine.status_code == 422


def test_long_keys_are_scoped_too(make_app: Any, live_server: Any) -> None:
    app, calls = build_callers(make_app)
    server = live_server(app)
    key = "k" * 255
    ids = set()
    for who in ("Bearer alice", "Bearer alice", "Bearer bob"):
        headers = {"Idempotency-Key": key, "Authorization": who}
        r = server.post("/me", json={"amount": 1}, headers=headers)
        assert r.status_code == 200
        assert r.json()["who"] == who
        ids.add(r.headers["Durable-Run-Id"])
    assert len(ids) == 2
    assert calls == {"Bearer alice": 1, "Bearer bob": 1}


def test_fingerprints_survive_a_secret_key_rotation(
    make_app: Any, live_server: Any
) -> None:
    app, calls = build_callers(make_app, SECRET_KEY="old")
    headers = {"Idempotency-Key": "rot", "Authorization": "Bearer alice"}
    first = live_server(app).post("/me", json={"amount": 1}, headers=headers)
    app.extensions["durable"].close()
    rotated, calls2 = build_callers(
        make_app, SECRET_KEY="new", SECRET_KEY_FALLBACKS=["old"]
    )
    again = live_server(rotated).post("/me", json={"amount": 1}, headers=headers)
    assert again.status_code == 200
    assert again.headers["Durable-Run-Id"] == first.headers["Durable-Run-Id"]
    assert calls2["Bearer alice"] == 0
