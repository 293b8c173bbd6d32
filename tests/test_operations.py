"""Operating runs: ``durable.retry``, ``durable.rewind``,
``durable.list_runs`` and the ``flask durable`` commands around them."""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from typing import Any

import pytest
from flask import Flask, jsonify

from flask_durable import Durable, step

durable = Durable()

#: Whether step "two" of /flow is "fixed" (it fails for good until then).
FIXED = {"two": False}
calls: Counter[str] = Counter()


@pytest.fixture
def db_url(any_db_url: str) -> str:
    """Every test here runs on SQLite and on PostgreSQL."""
    return any_db_url


@pytest.fixture(autouse=True)
def _reset() -> None:
    FIXED["two"] = False
    calls.clear()


def count(name: str) -> str:
    calls[name] += 1
    return name


def two() -> str:
    calls["two"] += 1
    if not FIXED["two"]:
        raise RuntimeError("step two is broken")
    return "two"


def build(make_app: Any) -> Flask:
    app = make_app()
    gate = threading.Event()
    app.config["gate"] = gate

    @app.post("/flow")
    @durable.endpoint(retries=1)
    def flow() -> Any:
        a = step.run("one", count, "one")
        b = step.run("two", two)
        c = step.run("three", count, "three")
        return jsonify(a=a, b=b, c=c)

    @app.post("/quick")
    @durable.endpoint
    def quick() -> Any:
        return jsonify(ok=True)

    @app.post("/nap")
    @durable.endpoint
    def nap() -> Any:
        step.run("start", count, "start")
        step.sleep("nap", "30s")
        return jsonify(ok=True)

    @app.post("/slow")
    @durable.endpoint
    def slow() -> Any:
        step.run("first", count, "first")
        step.run("held", lambda: calls.update(["held"]) or gate.wait(10))
        return jsonify(ok=True)

    return app


def wait_status(app: Flask, run_id: str, status: str, timeout: float = 15) -> Any:
    end = time.monotonic() + timeout
    while True:
        with app.app_context():
            info = durable.get_run(run_id)
        if info is not None and info.status == status:
            return info
        assert time.monotonic() < end, f"run {run_id} is {info and info.status}"
        time.sleep(0.05)


# -- over real HTTP -------------------------------------------------------------


def test_retry_and_rewind_over_http(make_app: Any, live_server: Any) -> None:
    app = build(make_app)
    server = live_server(app)
    r = server.post("/flow", allow_redirects=False)
    assert r.status_code == 303
    run_id = r.headers["Durable-Run-Id"]
    wait_url = r.headers["Location"]
    failed = server.get(wait_url)
    assert failed.status_code == 500
    wait_status(app, run_id, "failed")
    assert calls == {"one": 1, "two": 2}

    # Fixed: the run resumes from step two with fresh attempts.
    FIXED["two"] = True
    with app.app_context():
        assert durable.retry(run_id) is True
        info = durable.get_run(run_id)
        # The failed response is gone at once (unless the retried run has
        # already finished again, with its new response).
        assert info is not None
        assert info.response is None or info.status == "completed"
        assert info.response is None or info.response[0] == 200
    final = server.get(wait_url)
    assert final.status_code == 200, final.text
    assert final.json() == {"a": "one", "b": "two", "c": "three"}
    assert calls == {"one": 1, "two": 3, "three": 1}
    info = wait_status(app, run_id, "completed")
    steps = {s.id: s for s in info.steps}
    assert steps["one"].attempts == 1
    assert steps["two"].status == "completed" and steps["two"].attempts == 1
    assert [e["attempt"] for e in steps["two"].attempt_errors] == [0, 1]
    assert len(steps["two"].attempt_errors) == 2
    with app.app_context():
        with pytest.raises(ValueError, match="not failed"):
            durable.retry(run_id)

    # Rewound to step two: two and three run again, one does not.
    with app.app_context():
        assert durable.rewind(run_id, "two") is True
    again = server.get(wait_url)
    assert again.status_code == 200, again.text
    assert calls == {"one": 1, "two": 4, "three": 2}
    info = wait_status(app, run_id, "completed")
    assert [s.id for s in info.steps] == ["one", "two", "three"]
    assert {s.id: s.attempt_errors for s in info.steps}["two"] == []


def test_refusals(make_app: Any, live_server: Any) -> None:
    app = build(make_app)
    server = live_server(app)
    done = server.post("/quick")
    assert done.status_code == 200
    quick_id = done.headers["Durable-Run-Id"]
    with app.app_context():
        assert durable.retry("0" * 32) is False
        assert durable.rewind("0" * 32, "one") is False
        with pytest.raises(ValueError, match="completed, not failed"):
            durable.retry(quick_id)
        with pytest.raises(ValueError, match="no step 'nope'"):
            durable.rewind(quick_id, "nope")

    result: dict[str, Any] = {}
    client = threading.Thread(target=lambda: result.update(r=server.post("/slow")))
    client.start()
    try:
        end = time.monotonic() + 10
        while not calls["held"]:
            assert time.monotonic() < end
            time.sleep(0.02)
        run_id = next(iter(app.extensions["durable"].active))
        with app.app_context():
            with pytest.raises(ValueError, match="executing"):
                durable.rewind(run_id, "first")
            with pytest.raises(ValueError, match="running, not failed"):
                durable.retry(run_id)
    finally:
        app.config["gate"].set()
        client.join(10)
    assert result["r"].status_code == 200
    assert calls["first"] == 1


def test_list_runs_filters_and_pages(make_app: Any) -> None:
    app = build(make_app)
    client = app.test_client()
    ids = []
    for i in range(5):
        r = client.post("/quick", headers={"Idempotency-Key": f"key-{i}"})
        assert r.status_code == 200
        ids.append(r.headers["Durable-Run-Id"])
    nap = client.post("/nap").headers["Durable-Run-Id"]
    with app.app_context():
        everything, cursor = durable.list_runs()
        assert cursor is None
        assert [r.id for r in everything] == sorted([*ids, nap], reverse=True)
        seen: list[str] = []
        cursor = None
        pages = 0
        while True:
            page, cursor = durable.list_runs(limit=2, cursor=cursor)
            pages += 1
            assert len(page) <= 2
            seen += [r.id for r in page]
            if cursor is None:
                break
        assert pages == 3
        assert seen == [r.id for r in everything]
        sleeping, _ = durable.list_runs(status="sleeping")
        assert [r.id for r in sleeping] == [nap]
        assert sleeping[0].endpoint == "nap" and not sleeping[0].is_terminal
        quick, _ = durable.list_runs(endpoint="quick", status="completed")
        assert {r.id for r in quick} == set(ids)
        assert durable.list_runs(endpoint="nope")[0] == []
        assert [r.id for r in durable.list_runs(q=ids[2])[0]] == [ids[2]]
        assert [r.id for r in durable.list_runs(q="key-3")[0]] == [ids[3]]
        assert durable.list_runs(q="key-%")[0] == []
        with pytest.raises(ValueError, match="unknown run status"):
            durable.list_runs(status="done")
        with pytest.raises(ValueError, match="limit"):
            durable.list_runs(limit=0)
        with pytest.raises(ValueError, match="cursor"):
            durable.list_runs(cursor="x'; DROP")
        assert durable.cancel(nap)


# -- the command line -----------------------------------------------------------


def test_cli_commands(make_app: Any) -> None:
    app = build(make_app)
    client = app.test_client()
    runner = app.test_cli_runner()

    def cli(*args: str) -> Any:
        return runner.invoke(args=["durable", *args])

    r = client.post("/flow")
    assert r.status_code == 303
    run_id = r.headers["Durable-Run-Id"]
    wait_status(app, run_id, "failed")
    quick = client.post("/quick").headers["Durable-Run-Id"]

    out = cli("runs")
    assert out.exit_code == 0, out.output
    lines = out.output.splitlines()
    assert lines[0].split() == [
        "ID",
        "STATUS",
        "ENDPOINT",
        "ATTEMPT",
        "CREATED",
        "ERROR",
    ]
    assert lines[1].split()[:3] == [quick, "completed", "quick"]
    assert lines[2].split()[:3] == [run_id, "failed", "flow"]
    assert "StepError" in lines[2]
    out = cli("runs", "--status", "failed", "--json")
    assert out.exit_code == 0, out.output
    listed = json.loads(out.output)
    assert [r["id"] for r in listed["runs"]] == [run_id]
    assert listed["next_cursor"] is None
    out = cli("runs", "--limit", "1", "--endpoint", "quick", "--json")
    assert [r["id"] for r in json.loads(out.output)["runs"]] == [quick]
    assert cli("runs", "--status", "bogus").exit_code == 2

    out = cli("show", run_id)
    assert out.exit_code == 0, out.output
    assert "status    failed" in out.output
    assert "two  failed  attempts=2" in out.output
    assert "attempt 1: RuntimeError: step two is broken" in out.output
    out = cli("show", run_id, "--json")
    shown = json.loads(out.output)
    assert shown["status"] == "failed" and shown["response"]["status"] == 500
    assert [(s["id"], s["status"]) for s in shown["steps"]] == [
        ("one", "completed"),
        ("two", "failed"),
    ]
    assert len(shown["steps"][1]["attempt_errors"]) == 2
    out = cli("show", "0" * 32)
    assert out.exit_code == 1 and "no run" in out.output

    FIXED["two"] = True
    out = cli("retry", run_id)
    assert out.exit_code == 0, out.output
    wait_status(app, run_id, "completed")
    out = cli("retry", run_id)
    assert out.exit_code == 1 and "not failed" in out.output
    assert cli("retry", "0" * 32).exit_code == 1

    out = cli("rewind", run_id, "three")
    assert out.exit_code == 0, out.output
    wait_status(app, run_id, "completed")
    assert calls["three"] == 2 and calls["one"] == 1
    out = cli("rewind", run_id, "nope")
    assert out.exit_code == 1 and "no step 'nope'" in out.output
    assert cli("rewind", "0" * 32, "one").exit_code == 1

    nap = client.post("/nap").headers["Durable-Run-Id"]
    wait_status(app, nap, "sleeping")
    out = cli("cancel", nap)
    assert out.exit_code == 0 and "cancelled" in out.output
    out = cli("cancel", nap)
    assert out.exit_code == 1 and "unknown or already finished" in out.output

    out = cli("send", "order/paid", '{"total": 3}', "--id", "evt-1")
    assert out.exit_code == 0, out.output
    assert out.output.strip() == "evt-1"
    assert cli("send", "order/paid").exit_code == 0
    out = cli("send", "order/paid", "{nope")
    assert out.exit_code == 2 and "not JSON" in out.output
    out = cli("send", "", "{}")
    assert out.exit_code == 1

    out = cli("prune", "--older-than", "soon")
    assert out.exit_code == 2 and "older-than" in out.output
    out = cli("prune")  # the retention (7 days): nothing that old
    assert out.exit_code == 0 and "deleted 0 runs" in out.output
    time.sleep(0.01)
    out = cli("prune", "--older-than", "0s")
    assert out.exit_code == 0, out.output
    assert "deleted 3 runs" in out.output
    with app.app_context():
        assert durable.list_runs()[0] == []


def test_cli_prune_without_retention(make_app: Any) -> None:
    app = make_app(DURABLE_RETENTION=None)
    out = app.test_cli_runner().invoke(args=["durable", "prune"])
    assert out.exit_code == 2
    assert "--older-than" in out.output
