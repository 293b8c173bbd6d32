"""Credentials at rest (SPEC 7): real requests carrying credentials, then the
database read as bytes holds none of them in plaintext; payload encryption;
key rotation with fallbacks; a run no key decrypts fails once, cleanly."""

from __future__ import annotations

import glob
import json
import time
from collections import Counter
from typing import Any

import pytest
import requests
import sqlalchemy as sa
from flask import Flask, jsonify, request

from flask_durable import Durable, RetryAfterError, current_run, step
from flask_durable.crypto import Cipher, DecryptionError

durable = Durable()

CREDENTIALS = {
    "Authorization": "Bearer sekrit-token-123",
    "Cookie": "session=sekrit-cookie-456",
    "X-Api-Key": "sekrit-key-789",
}
PASSWORD = "sekrit-password-321"
STEP_SECRET = "sekrit-output-654"
SECRETS = ("sekrit-token-123", "sekrit-cookie-456", "sekrit-key-789")
PAYLOAD_SECRETS = (PASSWORD, STEP_SECRET)

calls: Counter[str] = Counter()


@pytest.fixture
def db_url(any_db_url: str) -> str:
    return any_db_url


@pytest.fixture(autouse=True)
def fresh_calls() -> None:
    calls.clear()


def build(make_app: Any, *, echo: bool = False, **config: Any) -> Flask:
    """An app whose durable endpoint fails its step once (so the scheduler
    replays the request) and checks it sees every credential."""
    config.setdefault("DURABLE_SENSITIVE_HEADERS", ["X-Api-Key"])
    app = make_app(**config)

    def fetch(name: str) -> str:
        calls[name] += 1
        if calls[name] == 1 or calls[name] < 0:
            raise RetryAfterError("not yet", "0.2s")
        return STEP_SECRET

    @app.post("/secret/<name>")
    @durable.endpoint
    def secret(name: str) -> Any:
        seen = (
            request.headers.get("Authorization") == CREDENTIALS["Authorization"]
            and request.cookies.get("session") == "sekrit-cookie-456"
            and request.headers.get("X-Api-Key") == CREDENTIALS["X-Api-Key"]
        )
        output = step.run("fetch", fetch, name)
        body = request.get_json()
        answer: dict[str, Any] = {"credentials": seen, "attempt": current_run.attempt}
        if echo:
            answer.update(password=body["password"], output=output)
        return jsonify(answer)

    return app


def start(server: Any, name: str, **headers: str) -> requests.Response:
    r = server.post(
        f"/secret/{name}",
        json={"password": PASSWORD},
        headers={**CREDENTIALS, **headers},
        allow_redirects=False,
    )
    assert r.status_code == 303, r.text
    return r


def finish(server: Any, first: requests.Response) -> requests.Response:
    """Follow the wait URL (with the same credentials) to the end."""
    r = server.get(first.headers["Location"], headers=CREDENTIALS)
    assert r.status_code == 200, r.text
    return r


def stored_bytes(app: Flask, url: str) -> bytes:
    """Everything the database holds: the SQLite files, or every text and
    bytea column of every ``durable_*`` table on PostgreSQL."""
    lifecycle = app.extensions["durable"]
    lifecycle.writer.flush()
    if url.startswith("sqlite"):
        path = url.split("///", 1)[1]
        data = b""
        for name in sorted(glob.glob(path + "*")):  # the file, -wal, -shm
            with open(name, "rb") as f:
                data += f.read()
        return data
    engine = sa.create_engine(url)
    chunks: list[bytes] = []
    try:
        with engine.connect() as conn:
            columns = conn.execute(
                sa.text(
                    "SELECT table_name, column_name FROM information_schema.columns"
                    " WHERE table_schema = current_schema()"
                    " AND table_name LIKE 'durable%'"
                    " AND data_type IN ('text', 'bytea', 'character varying', 'json',"
                    " 'jsonb')"
                )
            ).all()
            assert columns
            for table, column in columns:
                for (value,) in conn.execute(
                    sa.text(f'SELECT "{column}" FROM "{table}"')
                ):
                    if isinstance(value, str):
                        chunks.append(value.encode("utf-8"))
                    elif value is not None:
                        chunks.append(bytes(value))
    finally:
        engine.dispose()
    return b"\n".join(chunks)


def assert_absent(blob: bytes, secrets: tuple[str, ...]) -> None:
    for secret in secrets:
        assert secret.encode() not in blob, f"{secret} stored in plaintext"


def wait_status(app: Flask, run_id: str, statuses: set[str]) -> Any:
    lifecycle = app.extensions["durable"]
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        run = lifecycle.get_run(run_id)
        if run is not None and run.status.value in statuses:
            return run
        time.sleep(0.1)
    raise AssertionError(f"run {run_id} never reached {statuses}: {run}")


def test_credentials_encrypted_and_replayed(
    make_app: Any, live_server: Any, db_url: str
) -> None:
    app = build(make_app)
    server = live_server(app)
    first = start(server, "plain")
    r = finish(server, first)
    assert r.json()["credentials"] is True
    assert r.json()["attempt"] >= 1  # the scheduler replayed the request
    blob = stored_bytes(app, db_url)
    assert PASSWORD.encode() in blob  # the scan sees the stored request
    assert b"sekrit" not in blob.replace(PASSWORD.encode(), b"").replace(
        STEP_SECRET.encode(), b""
    )
    assert_absent(blob, SECRETS)


def test_replay_headers_allow_list(
    make_app: Any, live_server: Any, db_url: str
) -> None:
    app = build(
        make_app, DURABLE_REPLAY_HEADERS=["Authorization", "Cookie", "X-Api-Key"]
    )
    server = live_server(app)
    first = start(server, "allow", **{"X-Other": "not-kept-0001"})
    assert finish(server, first).json()["credentials"] is True
    blob = stored_bytes(app, db_url)
    assert b"not-kept-0001" not in blob
    assert b"X_OTHER" not in blob
    assert_absent(blob, SECRETS)


def test_payloads_encrypted(make_app: Any, live_server: Any, db_url: str) -> None:
    app = build(make_app, echo=True, DURABLE_ENCRYPT_PAYLOADS=True)
    server = live_server(app)
    first = start(server, "payload", **{"Idempotency-Key": "k-1"})
    answer = finish(server, first).json()
    assert answer == {
        "credentials": True,
        "attempt": answer["attempt"],
        "password": PASSWORD,
        "output": STEP_SECRET,
    }
    run_id = first.headers["Durable-Run-Id"]
    app.extensions["durable"].send("payment", {"card": "sekrit-card-777"})
    blob = stored_bytes(app, db_url)
    assert_absent(blob, SECRETS + PAYLOAD_SECRETS + ("sekrit-card-777",))
    # Decrypted for every reader: get_run, the wait URL, an idempotent repeat.
    run = app.extensions["durable"].get_run(run_id)
    assert run.steps[0].output == STEP_SECRET
    assert json.loads(run.response[2])["password"] == PASSWORD
    assert finish(server, first).json()["password"] == PASSWORD
    again = server.post(
        "/secret/payload",
        json={"password": PASSWORD},
        headers={**CREDENTIALS, "Idempotency-Key": "k-1"},
        allow_redirects=False,
    )
    assert again.status_code == 200, again.text
    assert again.json()["output"] == STEP_SECRET


def _suspended_run(make_app: Any, live_server: Any, name: str) -> str:
    """A run stored with key A, suspended, its app shut down."""
    app = build(
        make_app, DURABLE_SECRET_KEY="key-A-0123456789", DURABLE_SCHEDULER=False
    )
    calls[name] = -5  # fails (suspends) until the app with key B runs it
    first = start(live_server(app), name)
    app.extensions["durable"].close()
    calls[name] = 0  # the next call fails once more, then succeeds
    return first.headers["Durable-Run-Id"]


def test_key_rotation_with_fallbacks(make_app: Any, live_server: Any) -> None:
    run_id = _suspended_run(make_app, live_server, "rotate")
    app = build(
        make_app,
        DURABLE_SECRET_KEY="key-B-0123456789",
        DURABLE_SECRET_KEY_FALLBACKS=["key-A-0123456789"],
    )
    app.extensions["durable"].ensure_ready()
    run = wait_status(app, run_id, {"completed", "failed"})
    assert run.status.value == "completed", run.error
    assert json.loads(run.response[2])["credentials"] is True


def test_wrong_key_fails_once(make_app: Any, live_server: Any) -> None:
    run_id = _suspended_run(make_app, live_server, "wrong")
    app = build(make_app, DURABLE_SECRET_KEY="key-C-0123456789")
    app.extensions["durable"].ensure_ready()
    run = wait_status(app, run_id, {"completed", "failed"})
    assert run.status.value == "failed"
    assert "DecryptionError" in (run.error or "")
    assert "DURABLE_SECRET_KEY_FALLBACKS" in (run.error or "")
    attempt = run.attempt
    time.sleep(1)  # no endless retry: the run stays failed
    again = app.extensions["durable"].get_run(run_id)
    assert (again.status.value, again.attempt) == ("failed", attempt)


def test_cipher_unit() -> None:
    def no_default() -> str:
        raise AssertionError("the database secret is not needed")

    a = Cipher("key-A", (), no_default)
    sealed = a.encrypt_text("hello", b"ctx")
    assert sealed.startswith("!") and "hello" not in sealed
    assert a.decrypt_text(sealed, b"ctx") == "hello"
    with pytest.raises(DecryptionError):
        a.decrypt_text(sealed, b"other context")
    b = Cipher("key-B", ("key-A",), no_default)
    assert b.decrypt_text(sealed, b"ctx") == "hello"
    with pytest.raises(DecryptionError, match="FALLBACKS"):
        Cipher("key-C", (), no_default).decrypt_text(sealed, b"ctx")
    lazy = Cipher(None, (), lambda: "from-db")
    assert lazy._current is None  # nothing derived before first use
    assert Cipher("from-db", (), no_default).decrypt_text(lazy.encrypt_text("x")) == "x"
