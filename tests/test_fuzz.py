"""Fuzzing the HTTP surface and property tests not covered elsewhere.

1. schemathesis against the hand-written OpenAPI document of the blueprint
   (``tests/data/openapi.json``): the wait route (with real wait tokens of
   finished, running and credential-bound runs besides generated ones) and
   the events route (with the right, a wrong and no bearer key), positive
   and negative data: no 500, no response outside the document.
2. Wait tokens (:class:`flask_durable.tokens.WaitTokens`): round trips,
   mutated, expired and foreign-credential tokens.
3. Request bodies of durable endpoints: any bytes, JSON, form or raw, sent
   with ``Content-Length`` or chunked, replayed byte for byte after a step
   failed once; over the limit ``413`` before any step runs.

Durations, tagged values, event payloads and match paths are in
``tests/test_hostile_input.py``. The example counts are in
``docs/security.rst`` ("Testing").
"""

from __future__ import annotations

import json
import os
import string
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from flask import Flask, Response, jsonify, request
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from werkzeug.datastructures import Headers

from flask_durable import Durable, step
from flask_durable.tokens import WaitTokens

durable = Durable()
EVENT_KEY = "fuzz-event-key"
OPENAPI = Path(__file__).parent / "data" / "openapi.json"

PROPERTIES = settings(
    max_examples=200,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


def wait_until(predicate: Any, timeout: float = 10.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(0.05)


# -- 1. schemathesis against the blueprint's OpenAPI document ------------------

#: Examples per operation: twice this, positive and negative data mixed.
#: ``DURABLE_FUZZ_EXAMPLES=500 pytest tests/test_fuzz.py`` fuzzes longer.
FUZZ_EXAMPLES = int(os.environ.get("DURABLE_FUZZ_EXAMPLES", "25"))


def fuzz_app(make_app: Any) -> Flask:
    app = make_app(DURABLE_EVENT_KEY=EVENT_KEY, DURABLE_WAIT_TIMEOUT=0.3)

    @app.post("/job/<mode>")
    @durable.endpoint
    def job(mode: str) -> Any:
        if mode == "long":
            step.sleep("nap", "1h")  # still running when the fuzzing ends
        else:
            step.sleep("nap", 0.05)
        response = jsonify(mode=mode)
        response.headers["X-View"] = "yes"
        if mode == "teapot":
            response.status_code = 418
        return response

    return app


def start_run(server: Any, mode: str, **headers: str) -> str:
    r = server.post(f"/job/{mode}", headers=headers, allow_redirects=False)
    assert r.status_code == 303, r.text
    return r.headers["Location"].rsplit("/", 1)[1]


def test_blueprint_conforms_to_its_openapi_document(
    make_app: Any, live_server: Any
) -> None:
    import schemathesis
    from schemathesis import GenerationMode
    from schemathesis.checks import not_a_server_error
    from schemathesis.specs.openapi.checks import (
        content_type_conformance,
        response_headers_conformance,
        response_schema_conformance,
        status_code_conformance,
    )

    checks = [
        not_a_server_error,
        status_code_conformance,
        content_type_conformance,
        response_headers_conformance,
        response_schema_conformance,
    ]
    app = fuzz_app(make_app)
    server = live_server(app)
    tokens = [
        start_run(server, "done"),
        start_run(server, "teapot"),
        start_run(server, "long"),
        start_run(server, "done", Authorization="Bearer someone"),  # bound
        start_run(server, "long", Cookie="session=abc"),  # bound
    ]
    finished = tokens[:2]
    assert wait_until(
        lambda: all(
            server.get(
                f"/durable/wait/{t}", headers={"Prefer": "respond-async"}
            ).headers.get("X-View")
            for t in finished
        )
    )
    schema = schemathesis.openapi.from_dict(json.loads(OPENAPI.read_text()))
    seen: dict[tuple[str, int], int] = {}
    bearer = st.sampled_from(
        [f"Bearer {EVENT_KEY}"] * 4 + ["Bearer wrong", "Basic eA==", None]
    )

    for path, verb in (("/durable/wait/{token}", "GET"), ("/durable/events", "POST")):
        operation = schema[path][verb]
        cases = operation.as_strategy(GenerationMode.POSITIVE) | operation.as_strategy(
            GenerationMode.NEGATIVE
        )

        @settings(PROPERTIES, max_examples=2 * FUZZ_EXAMPLES)
        @given(
            case=cases,
            real=st.none() | st.sampled_from(tokens),
            auth=bearer,
            prefer=st.sampled_from([None, None, "respond-async"]),
        )
        def check(
            case: Any, real: str | None, auth: str | None, prefer: str | None
        ) -> None:
            headers = {}
            method = case.method.upper()
            if method == "GET" and real is not None:
                case.path_parameters = {"token": real}
            if method == "GET" and prefer is not None:
                headers["Prefer"] = prefer
            if method == "POST" and auth is not None:
                headers["Authorization"] = auth
            r = case.call_and_validate(
                base_url=server.url,
                headers=headers,
                checks=checks,
                timeout=10,
                allow_redirects=False,
            )
            seen[(method, r.status_code)] = seen.get((method, r.status_code), 0) + 1

        check()

    # Every kind of answer was reached at least once.
    for expected in [("GET", c) for c in (200, 202, 303, 404, 418)]:
        assert expected in seen, seen
    for code in (202, 400, 401):
        assert ("POST", code) in seen, seen


# -- 2. wait tokens --------------------------------------------------------------

#: Run ids as the engine makes them: 32 hex characters.
run_ids = st.from_regex(r"[0-9a-f]{32}", fullmatch=True)
#: Any run id a signer could be given without a dot (the fingerprint
#: separator) and in ASCII (what unsign decodes).
any_run_ids = run_ids | st.text(
    alphabet=string.ascii_letters + string.digits + "-_~:!$@", min_size=1, max_size=60
)
secrets_ = st.binary(min_size=1, max_size=64) | st.text(min_size=1, max_size=40)
#: Header values a client can send (no CR, LF or NUL).
header_values = st.text(
    alphabet=st.characters(blacklist_characters="\r\n\0"), max_size=60
)


def tokens_for(secret: str | bytes, ttl: float | None = None) -> WaitTokens:
    return WaitTokens(secret, lambda: "unused", ttl=ttl)


def credentials(authorization: str | None, cookie: str | None) -> Headers:
    headers = Headers()
    if authorization is not None:
        headers["Authorization"] = authorization
    if cookie is not None:
        headers["Cookie"] = cookie
    return headers


@PROPERTIES
@given(secrets_, any_run_ids)
def test_token_round_trips(secret: str | bytes, run_id: str) -> None:
    tokens = tokens_for(secret, ttl=60)
    token = tokens.sign(run_id)
    assert tokens.unsign(token) == run_id
    assert tokens.unsign(token, Headers({"Authorization": "x"})) == run_id
    assert tokens_for(secret, ttl=60).unsign(token) == run_id  # another process


@pytest.mark.xfail(
    strict=True,
    reason="WaitTokens cannot carry a run id holding '.' (the fingerprint"
    " separator, flask_durable/tokens.py:91) or non-ASCII (tokens.py:86);"
    " harmless while run ids are 32 hex characters (lifecycle._new_run_id)",
)
@settings(PROPERTIES, max_examples=100)
@given(st.text(min_size=1, max_size=20))
def test_token_round_trips_any_text_run_id(run_id: str) -> None:
    tokens = tokens_for("k")
    assert tokens.unsign(tokens.sign(run_id)) == run_id


def mutations(token: str) -> st.SearchStrategy[str]:
    raw = token.encode("ascii")
    flip = st.tuples(st.integers(0, len(raw) - 1), st.integers(1, 255)).map(
        lambda p: (raw[: p[0]] + bytes([raw[p[0]] ^ p[1]]) + raw[p[0] + 1 :]).decode(
            "latin-1"
        )
    )
    cut = st.integers(0, len(raw) - 1).map(lambda n: token[:n])
    append = st.text(min_size=1, max_size=8).map(lambda s: token + s)
    return flip | cut | append


@PROPERTIES
@given(st.data(), secrets_, run_ids, run_ids, st.booleans())
def test_mutated_token_never_unsigns_to_another_run(
    data: Any, secret: Any, run_id: str, other: str, bound: bool
) -> None:
    tokens = tokens_for(secret)
    headers = Headers({"Authorization": "Bearer me"}) if bound else None
    token = tokens.sign(run_id, headers)
    tokens.sign(other, headers)  # another valid token exists
    mutated = data.draw(mutations(token))
    got = tokens.unsign(mutated, headers)
    assert got is None or got == run_id, (mutated, got)
    if mutated != token:
        # Only the signature's base64 padding bits can change harmlessly.
        assert got is None or mutated.rsplit(".", 1)[0] == token.rsplit(".", 1)[0]


@PROPERTIES
@given(secrets_, run_ids, st.integers(2, 10**7), st.data())
def test_expired_token_never_unsigns(
    secret: Any, run_id: str, age: int, data: Any
) -> None:
    ttl = data.draw(st.floats(0, age - 2))
    tokens = tokens_for(secret, ttl=ttl)
    issued = int(time.time()) - age
    tokens.signer.get_timestamp = lambda: issued  # type: ignore[method-assign]
    token = tokens.sign(run_id)
    assert tokens.unsign(token) is None
    assert tokens_for(secret, ttl=age + 60).unsign(token) == run_id
    assert tokens_for(secret, ttl=None).unsign(token) == run_id


@PROPERTIES
@given(
    secrets_,
    run_ids,
    st.none() | header_values,
    st.none() | header_values,
    st.none() | header_values,
    st.none() | header_values,
)
def test_bound_token_needs_the_same_credentials(
    secret: Any,
    run_id: str,
    auth: str | None,
    cookie: str | None,
    other_auth: str | None,
    other_cookie: str | None,
) -> None:
    tokens = tokens_for(secret)
    mine = credentials(auth, cookie)
    theirs = credentials(other_auth, other_cookie)
    token = tokens.sign(run_id, mine)
    assert tokens.unsign(token, mine) == run_id
    if auth is None and cookie is None:
        assert tokens.unsign(token, theirs) == run_id  # not bound
        return
    assert tokens.unsign(token) is None
    expected = run_id if (auth, cookie) == (other_auth, other_cookie) else None
    assert tokens.unsign(token, theirs) == expected
    # Another key never accepts it, whatever the credentials.
    assert tokens_for(b"another " + str(secret).encode()).unsign(token, mine) is None


# -- 3. request bodies of durable endpoints --------------------------------------

BODY_LIMIT = 2048
CONTENT_TYPES = [
    "application/json",
    "application/x-www-form-urlencoded",
    "multipart/form-data; boundary=fuzz",
    "application/octet-stream",
    "text/plain; charset=utf-8",
    None,
]


@st.composite
def bodies(draw: Any) -> bytes:
    size = draw(
        st.integers(0, 64)
        | st.integers(BODY_LIMIT - 3, BODY_LIMIT + 3)
        | st.integers(0, BODY_LIMIT + 64)
    )
    kind = draw(st.sampled_from(["bytes", "json", "form"]))
    if kind == "json":
        text = json.dumps(draw(st.text(max_size=size)))
        return text.encode("utf-8", "surrogatepass")[: size or None]
    if kind == "form":
        pairs = draw(st.lists(st.tuples(st.text(max_size=8), st.text(max_size=8))))
        from urllib.parse import urlencode

        return urlencode(pairs).encode()[: size or None]
    return draw(st.binary(min_size=size, max_size=size))


def chunks(data: bytes, size: int) -> Iterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i : i + size]


@pytest.fixture
def echo_server(make_app: Any, live_server: Any) -> Any:
    app = make_app(DURABLE_MAX_REQUEST_BODY=BODY_LIMIT)
    failed: set[str] = set()
    calls: list[str] = []
    lock = threading.Lock()

    @app.route("/echo/<key>", methods=["POST", "PUT", "PATCH"])
    @durable.endpoint
    def echo(key: str) -> Any:
        def flaky() -> int:
            with lock:
                calls.append(key)
                if key not in failed:
                    failed.add(key)
                    raise RuntimeError("fails once")
            return len(request.get_data())

        size = step.run("flaky", flaky)
        body = request.get_data()
        return Response(
            json.dumps({"size": size, "body": body.hex()}),
            mimetype="application/json",
        )

    server = live_server(app)
    server.calls = calls
    return server


def test_request_bodies_replay_byte_for_byte(echo_server: Any) -> None:
    server = echo_server
    seen = {"chunked": 0, "length": 0, "413": 0}

    @settings(PROPERTIES, max_examples=int(2.4 * FUZZ_EXAMPLES))
    @given(
        bodies(),
        st.sampled_from(CONTENT_TYPES),
        st.sampled_from(["POST", "PUT", "PATCH"]),
        st.none() | st.integers(1, 700),
    )
    @example(b"x" * (BODY_LIMIT + 1), None, "POST", None)  # always one 413
    @example(b"y" * (BODY_LIMIT + 1), "application/json", "PUT", 512)
    def check(
        body: bytes, content_type: str | None, method: str, chunk: int | None
    ) -> None:
        key = uuid.uuid4().hex
        headers = {} if content_type is None else {"Content-Type": content_type}
        data: Any = body if chunk is None else chunks(body, chunk)
        seen["length" if chunk is None else "chunked"] += 1
        r = server.request(method, f"/echo/{key}", data=data, headers=headers)
        if len(body) > BODY_LIMIT:
            assert r.status_code == 413, (r.status_code, r.text[:200])
            assert r.json()["limit"] == BODY_LIMIT
            assert key not in server.calls
            seen["413"] += 1
            return
        # The step failed once (303), the run was replayed from the stored
        # request, and the wait URL (followed by requests) has its answer.
        assert r.status_code == 200, (r.status_code, r.text[:200])
        assert [h.status_code for h in r.history][:1] == [303]
        assert r.json() == {"size": len(body), "body": body.hex()}
        assert server.calls.count(key) == 2

    check()
    assert all(seen.values()), seen
