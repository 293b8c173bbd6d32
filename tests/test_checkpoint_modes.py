"""DURABLE_CHECKPOINT="async": the view never waits on the database."""

from __future__ import annotations

import time
from collections import Counter
from typing import Any

import pytest
from flask import jsonify

from flask_durable import Durable, step

durable = Durable()


@pytest.fixture
def db_url(any_db_url: str) -> str:
    return any_db_url


def wait_terminal(app: Any, run_id: str) -> Any:
    for _ in range(200):
        with app.app_context():
            info = durable.get_run(run_id)
        if info is not None and info.is_terminal:
            return info
        time.sleep(0.02)
    raise AssertionError(f"run {run_id} did not finish")


@pytest.mark.parametrize("where", ["config", "endpoint"])
def test_async_mode_checkpoints_everything(
    make_app: Any, live_server: Any, where: str
) -> None:
    config = {"DURABLE_CHECKPOINT": "async"} if where == "config" else {}
    app = make_app(**config)
    calls: Counter[str] = Counter()
    failed: set[str] = set()

    def flaky(name: str) -> str:
        calls[name] += 1
        if name == "b" and name not in failed:
            failed.add(name)
            raise OSError("flaky")
        return name

    options = {"checkpoint": "async"} if where == "endpoint" else {}

    @app.post("/go")
    @durable.endpoint(**options)
    def go() -> Any:
        out = [step.run(n, flaky, n) for n in ("a", "b", "c")]
        return jsonify(out=out)

    @app.post("/fast")
    @durable.endpoint(**options)
    def fast() -> Any:
        return jsonify(out=[step.run(n, lambda n=n: n * 2) for n in ("x", "y", "z")])

    server = live_server(app)
    r = server.post("/fast")
    assert r.json() == {"out": ["xx", "yy", "zz"]}
    info = wait_terminal(app, r.headers["Durable-Run-Id"])
    assert info.status == "completed"
    assert [(s.id, s.output) for s in info.steps] == [
        ("x", "xx"),
        ("y", "yy"),
        ("z", "zz"),
    ]

    r = server.post("/go")
    assert r.json() == {"out": ["a", "b", "c"]}
    assert r.history[0].status_code == 303
    # The checkpoint of "a" was flushed before the run suspended: not re-run.
    assert calls == Counter(a=1, b=2, c=1)
    info = wait_terminal(app, r.headers["Durable-Run-Id"])
    assert [s.attempts for s in info.steps] == [1, 2, 1]


def three_steps(make_app: Any, **config: Any) -> Any:
    """An async app whose ``/`` runs 3 steps returning 0, 1, 2."""
    app = make_app(DURABLE_CHECKPOINT="async", **config)

    @app.get("/")
    @durable.endpoint
    def view() -> Any:
        return jsonify(v=[step.run(f"s{i}", lambda i=i: i) for i in range(3)])

    return app


def test_many_async_runs_are_all_committed(make_app: Any) -> None:
    app = three_steps(make_app, DURABLE_CHECKPOINT_BATCH=16)
    client = app.test_client()
    ids = [client.get("/").headers["Durable-Run-Id"] for _ in range(60)]
    for run_id in ids:
        info = wait_terminal(app, run_id)
        assert info.status == "completed"
        assert [s.output for s in info.steps] == [0, 1, 2]


def test_get_run_sees_what_this_process_queued(make_app: Any) -> None:
    # A long batch interval: without the flush in get_run the run would
    # still be queued when it is read.
    app = three_steps(make_app, DURABLE_CHECKPOINT_INTERVAL=2.0)
    run_id = app.test_client().get("/").headers["Durable-Run-Id"]
    with app.app_context():
        info = durable.get_run(run_id)
    assert info is not None and info.status == "completed"
    assert [s.output for s in info.steps] == [0, 1, 2]
