"""OpenTelemetry spans (``DURABLE_OTEL``) over real HTTP: a span per
execution of a run and a child span per step attempt, continuing the
``traceparent`` of the request (replays included), or the current span of
an instrumented server; nothing at all when off."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest
from flask import Flask, jsonify
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import (
    InMemorySpanExporter,
)
from opentelemetry.trace import StatusCode

from flask_durable import Durable, NonRetriableError, step

durable = Durable()
exporter = InMemorySpanExporter()
failures: dict[str, int] = {}

TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
PARENT_ID = "b7ad6b7169203331"
TRACEPARENT = f"00-{TRACE_ID}-{PARENT_ID}-01"


@pytest.fixture(scope="module", autouse=True)
def _provider() -> None:
    """One SDK tracer provider for the process (it can be set only once),
    exporting to memory."""
    provider = trace.get_tracer_provider()
    if not isinstance(provider, TracerProvider):
        provider = TracerProvider()
        trace.set_tracer_provider(provider)
    provider.add_span_processor(SimpleSpanProcessor(exporter))


@pytest.fixture(autouse=True)
def _clean() -> Iterator[None]:
    exporter.clear()
    failures.clear()
    yield


def _flaky(name: str, times: int) -> str:
    left = failures.setdefault(name, times)
    if left > 0:
        failures[name] = left - 1
        raise ConnectionError(f"{name} is down")
    return name


def _fatal() -> None:
    raise NonRetriableError("card declined")


#: Span ids seen inside step functions (the current span there).
seen: dict[str, int] = {}


def _current_span_id(name: str) -> int:
    seen[name] = trace.get_current_span().get_span_context().span_id
    return seen[name]


def build(make_app: Any, **config: Any) -> Flask:
    config.setdefault("DURABLE_OTEL", True)
    app = make_app(durable, **config)

    @app.post("/book")
    @durable.endpoint
    def book() -> Any:
        first = step.run("first", _current_span_id, "first")
        second = step.run("second", _flaky, "second", 1)
        return jsonify(first=first, second=second)

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

    @app.post("/fan-out")
    @durable.endpoint
    def fan_out() -> Any:
        return jsonify(
            step.parallel(
                lambda: step.run("left", _current_span_id, "left"),
                lambda: step.run("right", _current_span_id, "right"),
            )
        )

    @app.post("/unstorable")
    @durable.endpoint
    def unstorable() -> Any:
        step.run("object", object)
        return "unreachable"

    return app


def spans(name_prefix: str = "durable.", count: int = 0) -> list[ReadableSpan]:
    """The finished spans whose name starts with ``name_prefix``, oldest
    first; waits (a little) for ``count`` of them: a span ends just after
    the response that a client may already have."""
    deadline = time.monotonic() + 5
    while True:
        found = [
            s for s in exporter.get_finished_spans() if s.name.startswith(name_prefix)
        ]
        if len(found) >= count or time.monotonic() > deadline:
            return sorted(found, key=lambda s: s.start_time or 0)
        time.sleep(0.02)


def test_replays_join_the_trace_of_the_request(
    make_app: Any, live_server: Any, any_db_url: str
) -> None:
    server = live_server(build(make_app, DURABLE_DATABASE_URI=any_db_url))
    # Step "second" fails once: the run is replayed by the scheduler, and
    # the client follows the redirect to its wait URL.
    r = server.post("/book", headers={"traceparent": TRACEPARENT})
    assert r.json()["second"] == "second"
    run_id = r.headers["Durable-Run-Id"]

    runs = spans("durable.run", 2)
    assert [s.name for s in runs] == ["durable.run book", "durable.run book"]
    first, replay = runs
    for span in runs:
        assert span.context.trace_id == int(TRACE_ID, 16)
        assert span.parent is not None and span.parent.span_id == int(PARENT_ID, 16)
        assert span.parent.is_remote
        assert span.attributes["durable.run.id"] == run_id
        assert span.attributes["durable.endpoint"] == "book"
    assert first.attributes["durable.run.attempt"] == 0
    assert first.attributes["durable.run.replay"] is False
    assert first.attributes["durable.run.outcome"] == "scheduled"
    assert replay.attributes["durable.run.attempt"] == 1
    assert replay.attributes["durable.run.replay"] is True
    assert replay.attributes["durable.run.outcome"] == "completed"

    steps = spans("durable.step", 3)
    by_parent = {
        run.context.span_id: [
            (s.name, s.attributes["durable.step.attempt"])
            for s in steps
            if s.parent is not None and s.parent.span_id == run.context.span_id
        ]
        for run in runs
    }
    # A memoized step has no span in the replay: it did not run again.
    assert by_parent[first.context.span_id] == [
        ("durable.step first", 0),
        ("durable.step second", 0),
    ]
    assert by_parent[replay.context.span_id] == [("durable.step second", 1)]
    one, failed, retried = steps
    assert all(s.context.trace_id == int(TRACE_ID, 16) for s in steps)
    assert one.attributes["durable.step.outcome"] == "completed"
    assert one.attributes["durable.step.id"] == "first"
    assert one.attributes["durable.run.id"] == run_id
    assert one.status.status_code is StatusCode.UNSET
    # The step's span is the current span while its function runs.
    assert seen["first"] == one.context.span_id
    assert failed.attributes["durable.step.outcome"] == "error"
    assert failed.status.status_code is StatusCode.ERROR
    assert [e.name for e in failed.events] == ["exception"]
    assert failed.events[0].attributes["exception.type"] == "ConnectionError"
    assert retried.attributes["durable.step.outcome"] == "completed"
    # Each span lies within its run's span.
    assert first.start_time <= one.start_time <= failed.end_time <= first.end_time


def test_without_traceparent_a_run_starts_a_trace(
    make_app: Any, live_server: Any
) -> None:
    server = live_server(build(make_app))
    assert server.post("/nap", allow_redirects=False).status_code == 303
    (run,) = spans("durable.run", 1)
    assert run.parent is None
    assert run.attributes["durable.run.outcome"] == "sleeping"
    assert run.status.status_code is StatusCode.UNSET


def test_the_current_span_of_an_instrumented_server_wins(
    make_app: Any, live_server: Any
) -> None:
    """Server instrumentation (here a WSGI middleware) already made the
    request's span current: the run span is its child."""
    app = build(make_app)
    tracer = trace.get_tracer("test-server")
    inner = app.wsgi_app

    def instrumented(environ: Any, start_response: Any) -> Any:
        with tracer.start_as_current_span("HTTP POST"):
            return inner(environ, start_response)

    app.wsgi_app = instrumented  # type: ignore[method-assign]
    server = live_server(app)
    r = server.post("/nap", headers={"traceparent": TRACEPARENT}, allow_redirects=False)
    assert r.status_code == 303
    (http,) = spans("HTTP POST", 1)
    (run,) = spans("durable.run", 1)
    assert run.parent is not None
    assert run.parent.span_id == http.context.span_id
    assert not run.parent.is_remote


def test_failed_run_and_step(make_app: Any, live_server: Any) -> None:
    server = live_server(build(make_app))
    assert server.post("/fatal").status_code == 500
    (run,) = spans("durable.run", 1)
    (charge,) = spans("durable.step", 1)
    assert run.attributes["durable.run.outcome"] == "failed"
    assert run.status.status_code is StatusCode.ERROR
    # Recorded once (by flask-durable, not again by the span's context).
    (error,) = run.events
    assert error.attributes["exception.type"].endswith(".StepError")
    assert charge.attributes["durable.step.outcome"] == "failed"
    assert charge.status.status_code is StatusCode.ERROR
    assert charge.events[0].attributes["exception.type"].endswith(".NonRetriableError")
    assert charge.parent is not None
    assert charge.parent.span_id == run.context.span_id


def test_parallel_branches_are_children_of_the_run(
    make_app: Any, live_server: Any
) -> None:
    server = live_server(build(make_app))
    assert server.post("/fan-out").status_code == 200
    (run,) = spans("durable.run", 1)
    branches = spans("durable.step", 2)
    assert {s.name for s in branches} == {"durable.step left", "durable.step right"}
    for span in branches:
        assert span.parent is not None
        assert span.parent.span_id == run.context.span_id
        assert span.attributes["durable.step.outcome"] == "completed"
    assert {seen["left"], seen["right"]} == {s.context.span_id for s in branches}


def test_attempt_left_unfinished_is_ended(make_app: Any, live_server: Any) -> None:
    """A step whose value cannot be stored raises in the view: its span is
    ended all the same, as ``unfinished``."""
    server = live_server(build(make_app))
    assert server.post("/unstorable").status_code == 500
    (run,) = spans("durable.run", 1)
    (step_span,) = spans("durable.step", 1)
    assert step_span.attributes["durable.step.outcome"] == "unfinished"
    assert step_span.status.status_code is StatusCode.ERROR
    assert run.attributes["durable.run.outcome"] == "failed"
    assert step_span.parent is not None
    assert step_span.parent.span_id == run.context.span_id
    assert step_span.end_time <= run.end_time


def test_off_means_no_spans_and_nothing_wired(make_app: Any, live_server: Any) -> None:
    app = build(make_app, DURABLE_OTEL=False)
    lifecycle = app.extensions["durable"]
    assert lifecycle.call_view is None
    assert lifecycle.observer is None
    server = live_server(app)
    assert server.post("/book", headers={"traceparent": TRACEPARENT}).status_code == 200
    assert spans(count=0) == []


def test_missing_opentelemetry_is_a_clear_error(db_url: str, monkeypatch: Any) -> None:
    monkeypatch.setitem(sys.modules, "opentelemetry.trace", None)  # not installed
    app = Flask("no_otel")
    app.config.update(DURABLE_OTEL=True, DURABLE_DATABASE_URI=db_url)
    with pytest.raises(ImportError, match=r"pip install 'flask-durable\[otel\]'"):
        Durable().init_app(app)
    assert "durable" not in app.extensions
