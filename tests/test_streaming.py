"""Streaming durable endpoints over real HTTP (SPEC 11), on SQLite and
PostgreSQL: the stream of a run read as it is written, with a failure in
the middle, resumed with Last-Event-ID, joined late; and the research
example in Chromium."""

from __future__ import annotations

import importlib.util
import json
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from flask import Flask, jsonify

from flask_durable import Durable, current_step, step

durable = Durable()
produced: list[str] = []


@pytest.fixture
def db_url(any_db_url: str) -> str:
    return any_db_url


@pytest.fixture(autouse=True)
def _reset() -> None:
    produced.clear()


def words(text: str, fail_at: int | None = None) -> Iterator[str]:
    for i, word in enumerate(text.split()):
        time.sleep(0.01)
        if fail_at == i and current_step.attempt == 0:
            raise ConnectionError("dropped mid-stream")
        produced.append(word)
        yield word


def build(make_app: Any) -> Flask:
    app = make_app(durable)

    @app.post("/ask")
    @durable.endpoint(retries=2)
    def ask() -> Any:
        draft = step.stream("draft", words, "alpha beta gamma delta", 2)
        final = step.stream("final", words, "epsilon zeta")
        return jsonify(answer=" ".join(draft + final))

    return app


def read_events(response: requests.Response) -> list[tuple[int, str, Any]]:
    """The (id, event, data) of a whole SSE response."""
    found, event_id, name, data = [], 0, "", ""
    for line in response.iter_lines(decode_unicode=True):
        if line.startswith("id: "):
            event_id = int(line[4:])
        elif line.startswith("event: "):
            name = line[7:]
        elif line.startswith("data: "):
            data += line[6:]
        elif line == "" and name:
            found.append((event_id, name, json.loads(data)))
            name, data = "", ""
    return found


def text_of(events: list[tuple[int, str, Any]], step_id: str) -> list[str]:
    """What a client keeps of a step: chunks since the last reset."""
    kept: list[str] = []
    for _, name, data in events:
        if name == "reset" and data["step"] == step_id:
            kept = []
        elif name == "chunk" and data["step"] == step_id:
            kept.append(data["data"])
    return kept


def test_endpoint_streams_its_run_through_a_failure(
    make_app: Any, live_server: Any
) -> None:
    server = live_server(build(make_app))
    with server.post(
        "/ask", headers={"Accept": "text/event-stream"}, stream=True
    ) as response:
        assert response.status_code == 200
        assert response.headers["Content-Type"].startswith("text/event-stream")
        run_id = response.headers["Durable-Run-Id"]
        wait_url = response.headers["Location"]
        events = read_events(response)
    ids = [i for i, _, _ in events]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    kinds = [name for _, name, _ in events]
    assert kinds.count("reset") == 1  # the failed attempt of "draft"
    assert kinds[-1] == "result"
    assert text_of(events, "draft") == ["alpha", "beta", "gamma", "delta"]
    assert text_of(events, "final") == ["epsilon", "zeta"]
    result = events[-1][2]
    assert result["status"] == 200 and result["run_status"] == "completed"
    assert json.loads(result["body"]) == {
        "answer": "alpha beta gamma delta epsilon zeta"
    }
    # The words before the failure were produced twice, the rest once; the
    # wait URL answers the same final response.
    assert produced.count("alpha") == 2 and produced.count("delta") == 1
    assert server.get(wait_url).json() == json.loads(result["body"])
    with server.app.app_context():
        info = durable.get_run(run_id)
    assert info is not None
    assert [s.output for s in info.steps] == [
        ["alpha", "beta", "gamma", "delta"],
        ["epsilon", "zeta"],
    ]

    # A late joiner gets everything from the start; Last-Event-ID resumes.
    stream_url = wait_url.replace("/wait/", "/stream/")
    late = read_events(server.get(stream_url, stream=True))
    assert late == events
    resumed = read_events(
        server.get(stream_url, headers={"Last-Event-ID": str(ids[5])}, stream=True)
    )
    assert resumed == [e for e in events if e[0] > ids[5]]
    # A client that has the result already is told nothing more.
    assert (
        read_events(
            server.get(stream_url, headers={"Last-Event-ID": str(ids[-1])}, stream=True)
        )
        == []
    )


def test_stream_reader_joining_mid_run(make_app: Any, live_server: Any) -> None:
    app = build(make_app)
    gate = threading.Event()

    @app.post("/slow")
    @durable.endpoint
    def slow() -> Any:
        def gated() -> Iterator[str]:
            yield "first"
            gate.wait(10)
            yield "second"

        return jsonify(words=step.stream("gated", gated))

    server = live_server(app)
    started: dict[str, Any] = {}

    def ask() -> None:
        with server.post(
            "/slow", headers={"Accept": "text/event-stream"}, stream=True
        ) as response:
            started["location"] = response.headers["Location"]
            started["events"] = read_events(response)

    client = threading.Thread(target=ask)
    client.start()
    end = time.monotonic() + 10
    while "location" not in started:
        assert time.monotonic() < end
        time.sleep(0.01)
    stream_url = started["location"].replace("/wait/", "/stream/")
    with server.get(stream_url, stream=True) as second:
        lines = second.iter_lines(decode_unicode=True)
        seen = []
        for line in lines:
            seen.append(line)
            if line == 'data: {"step":"gated","data":"first"}':
                gate.set()
            if line.startswith("event: result"):
                break
    client.join(10)
    assert any('"data":"second"' in line for line in seen)
    assert started["events"][-1][1] == "result"


def test_bad_stream_requests(make_app: Any, live_server: Any) -> None:
    server = live_server(build(make_app))
    assert server.get("/durable/stream/not-a-token").status_code == 404
    with server.post(
        "/ask",
        headers={"Accept": "text/event-stream", "Authorization": "Bearer a"},
        stream=True,
    ) as response:
        url = response.headers["Location"].replace("/wait/", "/stream/")
        read_events(response)
    # Bound to the caller's credentials, as wait URLs are.
    assert server.get(url).status_code == 404
    assert server.get(url, headers={"Authorization": "Bearer b"}).status_code == 404
    ok = server.get(url, headers={"Authorization": "Bearer a"}, stream=True)
    assert ok.status_code == 200 and read_events(ok)[-1][1] == "result"
    bad = server.get(url, headers={"Authorization": "Bearer a", "Last-Event-ID": "x1"})
    assert bad.status_code == 400
    js = server.get("/durable/stream.js")
    assert js.status_code == 200 and "DurableStream" in js.text


# -- the research example, over HTTP and in Chromium -------------------------------

RESEARCH = Path(__file__).parent.parent / "examples" / "research" / "app.py"


@pytest.fixture
def research(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[Flask]:
    spec = importlib.util.spec_from_file_location("research_app", RESEARCH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)
    spec.loader.exec_module(module)
    app: Flask = module.create_app(
        {
            "MODEL_DELAY": 0.01,
            "ANSWER_WORDS": 12,
            "DURABLE_RETRY_BACKOFF": 0.05,
            "DURABLE_POLL_INTERVAL": 0.2,
        },
        instance_path=str(tmp_path / "instance"),
    )
    yield app
    app.extensions["durable"].close()


def test_research_example_streams_with_a_failure(
    research: Flask, live_server: Any
) -> None:
    server = live_server(research)
    with server.post(
        "/ask",
        data={"question": "why?", "fail": "on"},
        headers={"Accept": "text/event-stream"},
        stream=True,
    ) as response:
        events = read_events(response)
    names = [n for _, n, _ in events]
    assert "reset" in names and names[-1] == "result"
    body = json.loads(events[-1][2]["body"])
    assert body["answer"].split() == [w.strip() for w in text_of(events, "answer")]
    assert len(body["sources"]) == 4


@pytest.mark.browser
def test_research_page_in_chromium(research: Flask, live_server: Any) -> None:
    if not Path("/usr/bin/chromium").exists():
        pytest.skip("Debian's chromium is not installed (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    server = live_server(research)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium")
        try:
            page = browser.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(server.url + "/")
            page.check("input[name=fail]")
            page.click("button")
            page.wait_for_selector("#step-answer .note", timeout=15000)
            page.wait_for_function(
                "document.getElementById('status').textContent.startsWith('done')",
                timeout=15000,
            )
            answer = page.inner_text("#step-answer .text").split()
            result = json.loads(page.inner_text("#result"))
            assert answer == result["answer"].split()
            assert (
                page.inner_text("#step-outline .text").split()
                == result["outline"].split()
            )
            assert errors == []
        finally:
            browser.close()
