"""``flask_durable.client.Session``: keys on unsafe methods, wait URLs
followed to the final response, retries with the same key, the deadline.

The first tests serve an app in this process; the last ones run
:mod:`procs.app` in a real server process that is SIGKILLed mid-run and
restarted on the same port while the session is calling it, and count the
step executions in the side-effect log the server appends to.
"""

from __future__ import annotations

import io
import json
import re
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import requests
from flask import Flask, jsonify, redirect, request
from procs import (
    ProcessManager,
    app_env,
    check_job,
    free_port,
    read_effects,
    wait_for,
)

from flask_durable import Durable, step
from flask_durable.client import DeadlineExceeded, Session

durable = Durable()
HEX_KEY = re.compile(r"[0-9a-f]{32}")


def quick(**options: Any) -> Session:
    """A session that polls and backs off fast (test servers answer fast)."""
    defaults: dict[str, Any] = dict(
        deadline=30, poll_interval=0.05, max_retry_after=0.1, backoff=0.02
    )
    return Session(**{**defaults, **options})


def durable_app(make_app: Callable[..., Flask], **config: Any) -> Flask:
    """``/charge`` fails its step once, ``/nap`` sleeps; every first (not
    replayed) request is recorded in ``app.config["seen"]``."""
    app = make_app(durable, **config)
    seen: list[dict[str, Any]] = []
    attempts: list[int] = []
    app.config.update(seen=seen, attempts=attempts)

    @app.before_request
    def record() -> None:
        if not durable.is_replay():
            seen.append(
                {"method": request.method, "path": request.path, **request.headers}
            )

    def flaky() -> int:
        attempts.append(1)
        if len(attempts) == 1:
            raise ConnectionError("the provider is down")
        return len(attempts)

    @app.post("/charge")
    @durable.endpoint
    def charge() -> Any:
        n = step.run("charge", flaky)
        return jsonify(attempt=n, key=request.headers.get("Idempotency-Key"))

    @app.post("/nap")
    @durable.endpoint
    def nap() -> Any:
        step.sleep("nap", request.get_json()["nap"])
        return jsonify(slept=True)

    return app


# -- in this process ------------------------------------------------------------


def test_key_added_and_wait_url_polled_to_the_final_response(
    make_app: Callable[..., Flask], live_server: Callable[[Flask], Any]
) -> None:
    app = durable_app(make_app)
    server = live_server(app)
    with quick() as http:
        # The wait URL is bound to the request's Authorization: the polls
        # must carry it, or they get 404.
        r = http.post(
            server.url + "/charge",
            data=b'{"amount": 5}',
            headers={"Authorization": "Bearer t", "content-type": "application/json"},
        )
    assert r.status_code == 200, r.text
    assert r.json()["attempt"] == 2
    key = r.json()["key"]
    assert HEX_KEY.fullmatch(key)
    seen = app.config["seen"]
    assert seen[0]["method"] == "POST" and seen[0]["Idempotency-Key"] == key
    assert seen[0]["Prefer"] == "respond-async"
    polls = seen[1:]
    assert polls and all(p["path"].startswith("/durable/wait/") for p in polls)
    assert all(p["method"] == "GET" and "Idempotency-Key" not in p for p in polls)
    assert all(p["Authorization"] == "Bearer t" for p in polls)
    assert all("Content-Type" not in p and "Content-Length" not in p for p in polls)
    run = durable_run(app, r.headers["Durable-Run-Id"])
    assert run.status == "completed"


def test_the_docs_example(
    make_app: Callable[..., Flask], live_server: Callable[[Flask], Any]
) -> None:
    """docs/client.rst includes this example."""
    base_url = live_server(durable_app(make_app)).url
    # [docs-example]
    from flask_durable.client import DeadlineExceeded, Session

    with Session(deadline=60) as http:
        try:
            r = http.post(f"{base_url}/charge", json={"amount": 5})
        except DeadlineExceeded as e:
            # The run goes on: GET e.wait_url later for its final response.
            raise RuntimeError(f"payment pending: {e.wait_url}") from e
        r.raise_for_status()  # the run's final response
        receipt = r.json()
    # [/docs-example]
    assert receipt["attempt"] == 2


def durable_run(app: Flask, run_id: str) -> Any:
    with app.app_context():
        run = durable.get_run(run_id)
    assert run is not None
    return run


def test_keys_only_on_unsafe_methods_and_never_replaced(
    live_server: Callable[[Flask], Any],
) -> None:
    app = Flask("keys")

    @app.route("/echo", methods=["GET", "POST", "PUT", "PATCH", "DELETE"])
    def echo() -> Any:
        return jsonify(key=request.headers.get("Idempotency-Key"))

    server = live_server(app)
    url = server.url + "/echo"
    with quick() as http:
        assert http.get(url).json() == {"key": None}
        keys = [http.request(m, url).json()["key"] for m in ("POST", "PUT", "PATCH")]
        keys.append(http.delete(url).json()["key"])
        assert all(HEX_KEY.fullmatch(k) for k in keys) and len(set(keys)) == 4
        mine = http.post(url, headers={"Idempotency-Key": "order-7"})
        assert mine.json() == {"key": "order-7"}
        none = http.post(url, headers={"Idempotency-Key": None})
        assert none.json() == {"key": None}


def test_a_plain_303_chain_is_followed_past_the_redirect_limit(
    make_app: Callable[..., Flask], live_server: Callable[[Flask], Any]
) -> None:
    """A proxy drops ``Prefer``: the endpoint and the wait URL answer
    ``303``, far more often than requests' 30 redirects."""
    app = durable_app(make_app, DURABLE_WAIT_TIMEOUT=0.02)
    wsgi = app.wsgi_app
    answers: list[int] = []

    def drop_prefer(environ: Any, start_response: Any) -> Any:
        environ.pop("HTTP_PREFER", None)

        def start(status: str, headers: Any, *args: Any) -> Any:
            if environ["PATH_INFO"].startswith("/durable/wait/"):
                answers.append(int(status.split()[0]))
            return start_response(status, headers, *args)

        return wsgi(environ, start)

    app.wsgi_app = drop_prefer  # type: ignore[method-assign]
    server = live_server(app)
    with quick() as http:
        r = http.post(server.url + "/nap", json={"nap": 2.5})
    assert r.status_code == 200 and r.json() == {"slept": True}
    assert len(answers) > 30, answers
    assert answers[-1] == 200 and set(answers[:-1]) == {303}


def test_temporary_answers_retried_with_the_same_key(
    live_server: Callable[[Flask], Any],
) -> None:
    app = Flask("gateway")
    keys: dict[str, list[str | None]] = {"/flaky": [], "/final": [], "/busy": []}

    @app.post("/flaky")
    def flaky() -> Any:
        keys["/flaky"].append(request.headers.get("Idempotency-Key"))
        n = len(keys["/flaky"])
        if n == 1:
            return "bad gateway", 502
        if n == 2:
            return "starting", 503, {"Retry-After": "0"}
        if n == 3:
            return (
                "the durable store is unavailable",
                503,
                {
                    "Retry-After": "2",
                    "Durable-Run-Id": "a" * 32,
                },
            )
        return redirect("/done", 303)

    @app.get("/done")
    def done() -> Any:
        return jsonify(done=True)

    @app.post("/final")
    def final() -> Any:
        """A run's own final response: a 504, with the run id."""
        keys["/final"].append(request.headers.get("Idempotency-Key"))
        return jsonify(error="run timed out"), 504, {"Durable-Run-Id": "b" * 32}

    @app.post("/busy")
    def busy() -> Any:
        keys["/busy"].append(request.headers.get("Idempotency-Key"))
        return "busy", 503, {"Retry-After": "0"}

    server = live_server(app)
    with quick() as http:
        r = http.post(server.url + "/flaky", data=b"body")
        assert r.status_code == 200 and r.json() == {"done": True}
        assert len(keys["/flaky"]) == 4 and len(set(keys["/flaky"])) == 1
        assert r.history and r.history[0].status_code == 303  # a plain redirect
        r = http.post(server.url + "/final")
        assert r.status_code == 504 and len(keys["/final"]) == 1
        # Not sent again: unsafe without a key, or a body read only once.
        r = http.post(server.url + "/busy", headers={"Idempotency-Key": None})
        assert r.status_code == 503 and keys["/busy"] == [None]
        r = http.post(server.url + "/busy", data=io.BytesIO(b"once"))
        assert r.status_code == 503 and len(keys["/busy"]) == 2


def test_retry_after_values() -> None:
    http = Session(max_retry_after=30)

    def after(value: str) -> float | None:
        response = requests.Response()
        response.headers["Retry-After"] = value
        return http._retry_after(response)

    assert after("2") == 2.0
    assert after("120") == 30.0
    assert after("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0
    assert after("soon") is None
    http.close()


def test_deadline_while_the_server_is_down() -> None:
    url = f"http://127.0.0.1:{free_port()}/book"
    started = time.monotonic()
    with quick(deadline=0.5) as http, pytest.raises(DeadlineExceeded) as caught:
        http.post(url, json={})
    assert time.monotonic() - started < 1.5
    assert isinstance(caught.value.__cause__, requests.ConnectionError)
    assert "deadline" in str(caught.value) and url in str(caught.value)


def test_deadline_while_the_run_sleeps(
    make_app: Callable[..., Flask], live_server: Callable[[Flask], Any]
) -> None:
    app = durable_app(make_app)
    server = live_server(app)
    started = time.monotonic()
    with quick(deadline=0.5) as http, pytest.raises(DeadlineExceeded) as caught:
        http.post(server.url + "/nap", json={"nap": "1h"})
    assert time.monotonic() - started < 1.5
    e = caught.value
    assert e.response is not None and e.response.status_code == 202
    assert e.run_id is not None and e.wait_url is not None
    assert e.wait_url.startswith(server.url + "/durable/wait/")
    assert durable_run(app, e.run_id).status == "sleeping"
    assert e.wait_url in str(e)


# -- a real server, SIGKILLed and restarted mid-run ------------------------------


def _sqlite(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'durable.sqlite3'}"


def _runs(effects: Any, job: str) -> set[str]:
    return {e.run for e in effects.executions if e.job == job}


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["between", "inside"])
def test_sigkill_mid_run_the_session_gets_the_one_runs_response(
    procs: ProcessManager, tmp_path: Path, mode: str
) -> None:
    """The server dies while the session's ``POST`` is executing the run
    (between two steps, or inside one); it comes back on the same port.
    The session retries with the same key, follows the run to its end and
    returns its final response; the steps ran once each (the one executing
    at the kill at most twice), all in one run."""
    env = app_env(tmp_path, _sqlite(tmp_path))
    port = free_port()
    server = procs.serve("server", env, port=port)
    first_pid = server.wait_healthy()["pid"]
    hold = tmp_path / "hold"
    hold.touch()
    job = f"client-{mode}"
    http = quick(deadline=60, max_backoff=0.2, max_retry_after=0.2)
    with ThreadPoolExecutor(1) as pool:
        call = pool.submit(
            http.post, f"{server.url}/crash", json={"job": job, "mode": mode}
        )
        marker = tmp_path / f"{mode}-{job}"
        run_id = wait_for(lambda: marker.exists() and marker.read_text(), 30, "barrier")
        server.kill()
        hold.unlink()
        time.sleep(0.5)  # the session retries against a closed port meanwhile
        assert not call.done()
        restarted = procs.serve("server-restarted", env, port=port)
        second_pid = restarted.wait_healthy()["pid"]
        r = call.result(timeout=60)
    http.close()
    assert r.status_code == 200, r.text
    assert r.headers["Durable-Run-Id"] == run_id
    body = r.json()
    assert body["pid"] == second_pid
    effects = read_effects(tmp_path)
    assert _runs(effects, job) == {run_id}  # the key was the same on every try
    assert effects.count(job, "one") == 1
    assert effects.count(job, "two") == (2 if mode == "inside" else 1)
    assert effects.count(job, "three") == 1
    committed = {name: value["x"] for name, value in body["steps"].items()}
    check_job(effects, job, committed, killed=[first_pid])


@pytest.mark.slow
def test_a_sleeping_run_is_polled_across_a_restart(
    procs: ProcessManager, tmp_path: Path
) -> None:
    """``Prefer: respond-async``: ``202`` from the endpoint, then polls of
    the wait URL ``Retry-After`` (1 s) apart, through a SIGKILL and restart
    of the server during the sleep, until the final response."""
    env = app_env(tmp_path, _sqlite(tmp_path))
    port = free_port()
    server = procs.serve("server", env, port=port)
    server.wait_healthy()
    answers: list[tuple[float, int, str, str | None]] = []

    def hook(response: requests.Response, *args: Any, **kwargs: Any) -> None:
        answers.append(
            (
                time.monotonic(),
                response.status_code,
                response.request.method or "",
                response.headers.get("Retry-After"),
            )
        )

    # Polls without Retry-After would come 0.1 s apart.
    http = Session(deadline=60, poll_interval=0.1, backoff=0.05, max_backoff=0.2)
    http.hooks["response"].append(hook)
    with ThreadPoolExecutor(1) as pool:
        call = pool.submit(
            http.post, f"{server.url}/nap", json={"job": "napper", "nap": 3}
        )
        wait_for(lambda: len(answers) >= 2, 30, "the first poll")
        server.kill()
        time.sleep(0.5)
        procs.serve("server-restarted", env, port=port).wait_healthy()
        r = call.result(timeout=60)
    http.close()
    assert r.status_code == 200, r.text
    assert r.json()["steps"].keys() == {"a", "b"}
    assert answers[0][1:3] == (202, "POST")
    polls = [a for a in answers[1:-1] if a[1] == 202]
    assert polls and all(a[2] == "GET" and a[3] == "1" for a in polls)
    gaps = [b[0] - a[0] for a, b in zip(answers[1:], answers[2:], strict=False)]
    assert all(gap >= 0.9 for gap in gaps), gaps
    effects = read_effects(tmp_path)
    assert effects.count("napper", "a") == 1 and effects.count("napper", "b") == 1
    assert len(_runs(effects, "napper")) == 1


@pytest.mark.slow
def test_deadline_then_the_wait_url_later(
    procs: ProcessManager, tmp_path: Path
) -> None:
    env = app_env(tmp_path, _sqlite(tmp_path))
    server = procs.serve("server", env)
    server.wait_healthy()
    with Session(deadline=1.5) as http:
        with pytest.raises(DeadlineExceeded) as caught:
            http.post(f"{server.url}/nap", json={"job": "late", "nap": 3})
        wait_url = caught.value.wait_url
        assert wait_url is not None and "/durable/wait/" in wait_url
        http.deadline = 30
        r = http.get(wait_url)
    assert r.status_code == 200
    assert r.headers["Durable-Run-Id"] == caught.value.run_id
    assert json.loads(r.text)["job"] == "late"
    effects = read_effects(tmp_path)
    assert effects.count("late", "a") == 1 and effects.count("late", "b") == 1
