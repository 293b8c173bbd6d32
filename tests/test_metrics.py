"""Prometheus metrics at ``<prefix>/metrics`` (``DURABLE_METRICS``) over
real HTTP: the access rule, the counters and the step histogram, the gauges
read from the database, one registry per app, and a clear error without
``prometheus_client``."""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import requests
from flask import Flask, jsonify, request
from prometheus_client.parser import text_string_to_metric_families

from flask_durable import Durable, NonRetriableError, step

durable = Durable()
#: The header the tests' dashboard_auth callback lets in.
ALLOW = {"X-Allow": "yes"}
failures: dict[str, int] = {}
#: Set to let the step of ``/block`` return.
release = threading.Event()


@pytest.fixture(autouse=True)
def _auth() -> Any:
    failures.clear()
    release.clear()
    durable.dashboard_auth(lambda: request.headers.get("X-Allow") == "yes")
    yield
    durable._access.auth = None


def _flaky(name: str, times: int) -> str:
    left = failures.setdefault(name, times)
    if left > 0:
        failures[name] = left - 1
        raise ConnectionError(f"{name} is down")
    return name


def _fatal() -> None:
    raise NonRetriableError("card declined")


def build(make_app: Callable[..., Flask], **config: Any) -> Flask:
    config.setdefault("DURABLE_METRICS", True)
    app = make_app(durable, **config)

    @app.post("/ok")
    @durable.endpoint
    def ok() -> Any:
        a = step.run("a", lambda: 1)
        b = step.run("b", lambda: time.sleep(0.05) or 2)
        return jsonify(a=a, b=b)

    @app.post("/retry")
    @durable.endpoint
    def retry() -> Any:
        return jsonify(step.run("flaky", _flaky, "retry", 1))

    @app.post("/fatal")
    @durable.endpoint
    def fatal() -> Any:
        step.run("charge", _fatal)
        return "unreachable"

    @app.post("/nap")
    @durable.endpoint
    def nap() -> Any:
        step.sleep("nap", "1h")
        return "rested"

    @app.post("/block")
    @durable.endpoint
    def block() -> Any:
        step.run("stored", lambda: 1)  # the run's row is written with it
        return jsonify(step.run("blocked", release.wait, 10))

    @app.post("/approval")
    @durable.endpoint
    def approval() -> Any:
        return jsonify(step.wait_for_event("approval", event="approved", timeout="1h"))

    return app


def scrape(
    server: Any, **kw: Any
) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """The samples of ``<prefix>/metrics``: ``{(name, labels): value}``."""
    r = server.get("/durable/metrics", headers=ALLOW, **kw)
    assert r.status_code == 200, r.text
    samples = {}
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def value(samples: dict[Any, float], name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def scrape_until(
    server: Any, check: Callable[[dict[Any, float]], bool]
) -> dict[Any, float]:
    """Scrape until ``check`` holds: signals are sent just after the waiters
    of a run are woken, so a scrape may come a moment before them."""
    deadline = time.monotonic() + 10
    while True:
        samples = scrape(server)
        if check(samples) or time.monotonic() > deadline:
            return samples
        time.sleep(0.05)


def test_no_route_when_off(make_app: Any, live_server: Any) -> None:
    server = live_server(build(make_app, DURABLE_METRICS=False))
    assert server.get("/durable/metrics", headers=ALLOW).status_code == 404


def test_same_access_rule_as_the_dashboard(make_app: Any, live_server: Any) -> None:
    server = live_server(build(make_app))
    refused = server.get("/durable/metrics")
    assert refused.status_code == 403
    assert "error" in refused.json()
    assert "durable_runs" not in refused.text
    assert server.get("/durable/metrics", headers=ALLOW).status_code == 200

    durable._access.auth = None  # no callback: closed outside debug mode
    refused = server.get("/durable/metrics", headers=ALLOW)
    assert refused.status_code == 403
    assert "dashboard_auth" in refused.json()["error"]


def test_exposition_formats(make_app: Any, live_server: Any) -> None:
    server = live_server(build(make_app))
    plain = server.get("/durable/metrics", headers=ALLOW)
    assert plain.headers["Content-Type"].startswith("text/plain")
    assert "# TYPE durable_step_attempts_total counter" in plain.text
    open_metrics = server.get(
        "/durable/metrics",
        headers={**ALLOW, "Accept": "application/openmetrics-text; version=1.0.0"},
    )
    assert open_metrics.headers["Content-Type"].startswith(
        "application/openmetrics-text"
    )
    assert open_metrics.text.endswith("# EOF\n")


def test_runs_and_steps_are_counted(
    make_app: Any, live_server: Any, any_db_url: str
) -> None:
    server = live_server(build(make_app, DURABLE_DATABASE_URI=any_db_url))
    assert server.post("/ok").json() == {"a": 1, "b": 2}
    assert server.post("/ok").status_code == 200
    # Fails once, then resumed by the scheduler: the client follows the
    # redirect to its wait URL.
    assert server.post("/retry").json() == "retry"
    assert server.post("/fatal").status_code == 500

    s = scrape_until(
        server,
        lambda s: (
            value(s, "durable_runs_finished_total", endpoint="fatal", status="failed")
            == 1
        ),
    )
    assert value(s, "durable_runs_started_total", endpoint="ok") == 2
    assert value(s, "durable_runs_started_total", endpoint="retry") == 1
    assert value(s, "durable_runs_resumed_total", endpoint="retry") == 1
    assert value(s, "durable_runs_resumed_total", endpoint="ok") == 0
    assert (
        value(s, "durable_runs_finished_total", endpoint="ok", status="completed") == 2
    )
    assert (
        value(s, "durable_runs_finished_total", endpoint="retry", status="completed")
        == 1
    )

    attempts = "durable_step_attempts_total"
    assert value(s, attempts, endpoint="ok", outcome="completed") == 4
    assert value(s, attempts, endpoint="retry", outcome="error") == 1
    assert value(s, attempts, endpoint="retry", outcome="completed") == 1
    assert value(s, attempts, endpoint="fatal", outcome="failed") == 1
    assert value(s, attempts, endpoint="fatal", outcome="completed") == 0

    # Every attempt is timed: step "b" sleeps 50 ms in each of two runs.
    assert value(s, "durable_step_duration_seconds_count", endpoint="ok") == 4
    assert value(s, "durable_step_duration_seconds_sum", endpoint="ok") >= 0.1
    assert value(s, "durable_step_duration_seconds_count", endpoint="retry") == 2
    le_1s = value(s, "durable_step_duration_seconds_bucket", endpoint="ok", le="1.0")
    assert le_1s == 4
    # Label values are bounded: endpoints and outcomes, never run or step ids.
    labels = {name for (_, pairs) in s for name, _ in pairs}
    assert labels <= {"endpoint", "outcome", "status", "le"}


def test_cancelled_runs_are_counted(make_app: Any, live_server: Any) -> None:
    server = live_server(build(make_app))
    r = server.post("/nap", allow_redirects=False)
    assert r.status_code == 303
    assert durable_cancel(server.app, r.json()["run_id"])
    s = scrape_until(
        server,
        lambda s: (
            value(s, "durable_runs_finished_total", endpoint="nap", status="cancelled")
            == 1
        ),
    )
    assert (
        value(s, "durable_runs_finished_total", endpoint="nap", status="cancelled") == 1
    )


def durable_cancel(app: Flask, run_id: str) -> bool:
    with app.app_context():
        return durable.cancel(run_id)


def test_unfinished_runs_are_read_from_the_database(
    make_app: Any, live_server: Any, any_db_url: str
) -> None:
    # No scheduler: a run whose step failed stays due, and nobody claims it.
    app = build(make_app, DURABLE_SCHEDULER=False, DURABLE_DATABASE_URI=any_db_url)
    server = live_server(app)
    s = scrape(server)
    # Every unfinished status is there, 0 when no run has it.
    for status in ("running", "scheduled", "sleeping", "waiting", "queued"):
        assert value(s, "durable_runs", status=status) == 0
    assert value(s, "durable_runs_due") == 0
    assert value(s, "durable_runs_due_delay_seconds") == 0

    assert server.post("/nap", allow_redirects=False).status_code == 303
    assert server.post("/nap", allow_redirects=False).status_code == 303
    assert server.post("/approval", allow_redirects=False).status_code == 303
    assert server.post("/retry", allow_redirects=False).status_code == 303
    assert server.post("/ok").status_code == 200
    # A run executing now: its lease is held, so it is not due.
    blocked = threading.Thread(target=server.post, args=("/block",))
    blocked.start()
    time.sleep(0.3)  # the retry (backoff 0.05 s) is due by now

    try:
        s = scrape(server)
    finally:
        release.set()
        blocked.join(10)
    assert value(s, "durable_runs", status="sleeping") == 2
    assert value(s, "durable_runs", status="waiting") == 1
    assert value(s, "durable_runs", status="scheduled") == 1
    assert value(s, "durable_runs", status="running") == 1
    # Finished runs are counted by durable_runs_finished_total only.
    assert ("durable_runs", (("status", "completed"),)) not in s
    assert value(s, "durable_runs_due") == 1
    assert 0.1 < value(s, "durable_runs_due_delay_seconds") < 60


def test_one_registry_per_app(make_app: Any, live_server: Any) -> None:
    """Two apps in one process, sharing a database under two app ids: each
    has its own metrics (a global registry would refuse the second app's
    metrics, or mix both apps' counts) and counts its own runs."""
    first = live_server(build(make_app))
    second = live_server(build(make_app, DURABLE_APP_ID="second"))
    assert first.post("/ok").status_code == 200
    assert first.post("/nap", allow_redirects=False).status_code == 303
    a = scrape(first)
    b = scrape(second)
    assert value(a, "durable_runs_started_total", endpoint="ok") == 1
    assert value(b, "durable_runs_started_total", endpoint="ok") == 0
    assert (
        value(a, "durable_step_attempts_total", endpoint="ok", outcome="completed") == 2
    )
    assert (
        value(b, "durable_step_attempts_total", endpoint="ok", outcome="completed") == 0
    )
    assert value(a, "durable_runs", status="sleeping") == 1
    assert value(b, "durable_runs", status="sleeping") == 0


@pytest.mark.slow
def test_gunicorn_workers_are_summed(procs: Any, tmp_path: Any) -> None:
    """Under gunicorn with ``PROMETHEUS_MULTIPROC_DIR`` set (the multi-process
    mode of ``prometheus_client``), whichever worker answers a scrape counts
    the runs of every worker."""
    from procs import VENV_BIN, app_env, free_port, wait_for

    port = free_port()
    multiproc = tmp_path / "prometheus"
    multiproc.mkdir()
    env = app_env(
        tmp_path,
        f"sqlite:///{tmp_path / 'durable.sqlite3'}",
        PROMETHEUS_MULTIPROC_DIR=multiproc,
    )
    args = [str(VENV_BIN / "gunicorn"), "--bind", f"127.0.0.1:{port}"]
    args += ["--workers", "3", "metrics_app:app"]
    server = procs.start("gunicorn", args, env, url=f"http://127.0.0.1:{port}")

    def answered() -> Any:
        assert server.alive(), server.output()[-3000:]
        try:
            return server.get("/durable/metrics", timeout=5).status_code == 200
        except requests.RequestException:
            return None

    wait_for(answered, 30, "gunicorn to answer")
    # Sync workers serve one request at a time: requests sent at once are
    # shared among them.
    with ThreadPoolExecutor(6) as pool:
        pids = set(pool.map(lambda _: server.post("/work").json(), range(30)))
    assert len(pids) > 1, "every request went to one worker"
    for _ in range(5):
        s = scrape(server)
        assert value(s, "durable_runs_started_total", endpoint="work") == 30
        count = "durable_step_duration_seconds_count"
        assert value(s, count, endpoint="work") == 30
        assert value(s, "durable_runs", status="running") == 0


def test_scrape_answers_when_the_database_is_down(
    make_app: Any, live_server: Any, caplog: Any
) -> None:
    """The counters are still served; the database gauges are left out (an
    absent series, not a stale value) and a warning says why."""
    app = build(
        make_app,
        # Nothing listens on port 1 of the loopback: connections are refused.
        DURABLE_DATABASE_URI="postgresql+psycopg://nobody@127.0.0.1:1/none",
    )
    server = live_server(app)
    r = server.get("/durable/metrics", headers=ALLOW)
    assert r.status_code == 200
    assert "# TYPE durable_step_attempts_total counter" in r.text
    assert "durable_runs_due" not in r.text
    assert 'durable_runs{status="waiting"}' not in r.text
    warnings = [r.getMessage() for r in caplog.records]
    assert any("metrics: the database cannot be read" in w for w in warnings)


def test_missing_prometheus_client_is_a_clear_error(
    db_url: str, monkeypatch: Any
) -> None:
    monkeypatch.setitem(sys.modules, "prometheus_client", None)  # not installed
    app = Flask("no_prometheus")
    app.config.update(DURABLE_METRICS=True, DURABLE_DATABASE_URI=db_url)
    with pytest.raises(ImportError, match=r"pip install 'flask-durable\[prometheus\]'"):
        Durable().init_app(app)
    assert "durable" not in app.extensions
