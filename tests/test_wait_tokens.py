"""Wait tokens (SPEC 7): they expire, survive a key rotation with fallbacks,
are bound to the credentials of the request that got them, and waiting
clients cannot hold every thread of a server."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest
import requests
from procs import VENV_BIN, ProcessManager, app_env, free_port
from steps_app import build
from werkzeug.datastructures import Headers

from flask_durable.tokens import WaitTokens

#: The run stays unfinished while a test asks its wait URL a few times.
SLOW = {
    "DURABLE_RETRY_BACKOFF": 1.5,
    "DURABLE_RETRY_BACKOFF_MAX": 1.5,
}


@pytest.fixture
def db_url(any_db_url: str) -> str:
    """Every test here runs on SQLite and on PostgreSQL (but the gunicorn
    one, which brings its own database)."""
    return any_db_url


def _is_404_json(r: requests.Response) -> bool:
    return (
        r.status_code == 404
        and r.headers["Content-Type"] == "application/json"
        and "error" in r.json()
    )


def test_token_expires(make_app: Any, live_server: Any) -> None:
    app, _ = build(make_app, DURABLE_WAIT_TOKEN_TTL=2, **SLOW)
    server = live_server(app)
    location = server.post("/retry", allow_redirects=False).headers["Location"]
    fresh = server.get(
        location, headers={"Prefer": "respond-async"}, allow_redirects=False
    )
    assert fresh.status_code == 202
    time.sleep(3.2)  # timestamps are whole seconds: well past 2 s
    assert _is_404_json(server.get(location, allow_redirects=False))


def test_rotation_keeps_wait_urls_with_fallbacks(
    make_app: Any, live_server: Any
) -> None:
    old, _ = build(make_app, SECRET_KEY="old-key")
    location = live_server(old).post("/retry", allow_redirects=False)
    location = location.headers["Location"]
    rotated = make_app(SECRET_KEY="new-key", DURABLE_SECRET_KEY_FALLBACKS=["old-key"])
    r = rotated.test_client().get(location)
    assert r.status_code == 200
    assert r.get_json()["second"] == "second-ok"
    # The new key alone does not know the old token.
    forgotten = make_app(SECRET_KEY="new-key")
    assert forgotten.test_client().get(location).status_code == 404
    # And tokens of the rotated app are signed with the new key.
    with rotated.test_request_context():
        token = rotated.extensions["durable"].wait_url("0" * 32).rsplit("/", 1)[1]
    assert WaitTokens("new-key", str).unsign(token) == "0" * 32
    assert WaitTokens("old-key", str).unsign(token) is None


@pytest.mark.parametrize(
    "credentials",
    [
        pytest.param({"Authorization": "Bearer alice"}, id="authorization"),
        pytest.param({"Cookie": "session=alice"}, id="cookie"),
    ],
)
def test_wait_url_is_bound_to_credentials(
    make_app: Any, live_server: Any, credentials: dict[str, str]
) -> None:
    app, _ = build(make_app, **SLOW)
    server = live_server(app)
    r = server.post("/retry", headers=credentials, allow_redirects=False)
    assert r.status_code == 303
    location = r.headers["Location"]
    others = [
        {},
        {"Authorization": "Bearer mallory"},
        {"Cookie": "session=mallory"},
        {**credentials, "Cookie": "session=alice; extra=1"}
        if "Cookie" in credentials
        else {**credentials, "Cookie": "session=alice"},
    ]
    for headers in others:
        for prefer in ({}, {"Prefer": "respond-async"}):
            denied = server.get(
                location, headers={**headers, **prefer}, allow_redirects=False
            )
            assert _is_404_json(denied), (headers, denied.status_code)
    polled = server.get(
        location,
        headers={**credentials, "Prefer": "respond-async"},
        allow_redirects=False,
    )
    assert polled.status_code == 202
    # A tampered bound token is still a plain 404.
    tampered = location[:-2] + ("AA" if not location.endswith("AA") else "BB")
    assert _is_404_json(server.get(tampered, headers=credentials))
    final = server.get(location, headers=credentials)
    assert final.status_code == 200
    assert final.json()["second"] == "second-ok"
    assert _is_404_json(server.get(location))


def test_idempotent_repeat_location_is_bound(make_app: Any, live_server: Any) -> None:
    app, _ = build(make_app, **SLOW)
    server = live_server(app)
    headers = {"Authorization": "Bearer alice", "Idempotency-Key": "k-1"}
    first = server.post("/retry", headers=headers, allow_redirects=False)
    repeat = server.post("/retry", headers=headers, allow_redirects=False)
    assert repeat.status_code == 303
    location = repeat.headers["Location"]
    assert location == first.headers["Location"] or location.startswith("/durable/")
    prefer = {"Prefer": "respond-async"}
    assert _is_404_json(server.get(location, headers=prefer, allow_redirects=False))
    ok = server.get(
        location,
        headers={"Authorization": "Bearer alice", **prefer},
        allow_redirects=False,
    )
    assert ok.status_code == 202
    done = server.get(location, headers={"Authorization": "Bearer alice"})
    assert done.status_code == 200


def test_unbound_wait_url_answers_anyone(make_app: Any, live_server: Any) -> None:
    app, _ = build(make_app)
    server = live_server(app)
    location = server.post("/retry", allow_redirects=False).headers["Location"]
    r = server.get(location, headers={"Authorization": "Bearer anyone"})
    assert r.status_code == 200


def test_tokens_unit() -> None:
    tokens = WaitTokens("k2", str, fallbacks=["k1"], ttl=None)
    alice = Headers({"Authorization": "Bearer alice"})
    bob = Headers({"Authorization": "Bearer bob"})
    token = tokens.sign("r1", alice)
    assert "alice" not in token
    assert tokens.unsign(token, alice) == "r1"
    assert tokens.unsign(token, bob) is None
    assert tokens.unsign(token, Headers()) is None
    assert tokens.unsign(token) is None
    # Signed with the old key (bound with it too): still accepted.
    old = WaitTokens("k1", str).sign("r2", alice)
    assert tokens.unsign(old, alice) == "r2"
    assert tokens.unsign(tokens.sign("r3"), bob) == "r3"
    for bad in ("", "r1", "r1.x.y", token + "x", "é" * 10):
        assert tokens.unsign(bad, alice) is None


def test_prefer_respond_async_answers_at_once(make_app: Any, live_server: Any) -> None:
    app, _ = build(make_app, DURABLE_WAIT_TIMEOUT=30, **SLOW)
    server = live_server(app)
    location = server.post("/retry", allow_redirects=False).headers["Location"]
    started = time.monotonic()
    r = server.get(location, headers={"Prefer": "respond-async"}, timeout=10)
    assert r.status_code == 202
    assert r.headers["Retry-After"]
    assert time.monotonic() - started < 5  # not the 30 s long-poll


def test_waits_beyond_the_cap_are_not_held(make_app: Any, live_server: Any) -> None:
    app, _ = build(make_app, DURABLE_WAIT_TIMEOUT=30, DURABLE_MAX_HELD_WAITS=0, **SLOW)
    server = live_server(app)
    location = server.post("/retry", allow_redirects=False).headers["Location"]
    started = time.monotonic()
    r = server.get(location, allow_redirects=False, timeout=10)
    assert r.status_code == 303
    assert r.headers["Location"] == location
    assert time.monotonic() - started < 5  # not the 30 s long-poll
    # A client following the redirects still gets its result (quick hops:
    # more than the 30 redirects requests follows by default).
    with requests.Session() as s:
        s.max_redirects = 10_000
        assert s.get(server.url + location, timeout=30).status_code == 200


def test_max_held_waits_is_validated(make_app: Any) -> None:
    with pytest.raises(ValueError, match="DURABLE_MAX_HELD_WAITS"):
        make_app(DURABLE_MAX_HELD_WAITS=-1)


# -- gunicorn gthread, 100 waiting clients ----------------------------------


@pytest.mark.slow
@pytest.mark.postgres
def test_waiting_clients_cannot_starve_gunicorn(
    procs: ProcessManager, tmp_path: Path, pg_url: str
) -> None:
    port = free_port()
    args = [
        str(VENV_BIN / "gunicorn"),
        "--bind",
        f"127.0.0.1:{port}",
        "--worker-class",
        "gthread",
        "--workers",
        "1",
        "--threads",
        "8",
        "--timeout",
        "60",
        "procs.app:app",
    ]
    # The default long-poll: without a cap, 8 waits would hold every thread.
    env = app_env(tmp_path, pg_url, DURABLE_WAIT_TIMEOUT="25")
    server = procs.start("gunicorn-waits", args, env, url=f"http://127.0.0.1:{port}")
    server.wait_healthy()
    locations = []
    for i in range(20):
        r = server.post(
            "/nap",
            json={"job": f"job-{i}", "nap": 3},
            allow_redirects=False,
            timeout=10,
        )
        assert r.status_code == 303, r.text
        locations.append((f"job-{i}", r.headers["Location"]))
    results: dict[int, Any] = {}

    def client(n: int) -> None:
        job, location = locations[n % len(locations)]
        try:
            with requests.Session() as s:
                r = s.get(server.url + location, timeout=60)
            results[n] = (job, r.status_code, r.json().get("job"), len(r.history))
        except Exception as e:  # noqa: BLE001 - reported below
            results[n] = (job, repr(e), None, None)

    clients = [threading.Thread(target=client, args=(n,)) for n in range(100)]
    for t in clients:
        t.start()
    latencies = []
    deadline = time.monotonic() + 40
    while any(t.is_alive() for t in clients) and time.monotonic() < deadline:
        started = time.monotonic()
        r = server.get("/health", timeout=30)
        latencies.append(time.monotonic() - started)
        assert r.status_code == 200
        time.sleep(0.1)
    for t in clients:
        t.join(30)
    assert latencies
    # Generous: the point is "answered", not a benchmark.
    assert max(latencies) < 5, sorted(latencies)[-5:]
    assert len(results) == 100
    bad = {n: r for n, r in results.items() if r[1] != 200 or r[0] != r[2]}
    assert not bad, bad
