"""Checkpoint modes: with DURABLE_CHECKPOINT="async" the view never waits
on the database; with DURABLE_GROUP_COMMIT concurrent sync checkpoints share
transactions and each request still waits for its own commit.

DURABLE_SQLITE_SYNCHRONOUS="FULL": tests/test_checkpoint_modes_sqlite.py."""

from __future__ import annotations

import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import sqlalchemy as sa
from flask import jsonify

from flask_durable import Durable, current_run, step

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


# -- DURABLE_GROUP_COMMIT: concurrent sync checkpoints share transactions ----


def test_group_commit_under_concurrency(
    make_app: Any, live_server: Any, db_url: str
) -> None:
    app = make_app(DURABLE_GROUP_COMMIT=True)
    calls: Counter[str] = Counter()
    seen: dict[str, Any] = {}
    # Another connection, outside the library: it sees committed rows only
    # (durable.get_run would commit what the writer still has queued).
    outside = sa.create_engine(db_url, poolclass=sa.pool.NullPool)

    def committed(run_id: str, step_id: str) -> bool:
        with outside.connect() as conn:
            status = conn.exec_driver_sql(
                "SELECT status FROM durable_steps WHERE run_id = :r AND step_id = :s"
                if db_url.startswith("sqlite")
                else "SELECT status FROM durable_steps WHERE run_id = %(r)s"
                " AND step_id = %(s)s",
                {"r": run_id, "s": step_id},
            ).scalar()
        return status == "completed"

    @app.post("/go/<int:n>")
    @durable.endpoint
    def go(n: int) -> Any:
        values = []
        for name in ("a", "b", "c"):
            value = step.run(name, lambda name=name: f"{name}{n}")
            # Sync semantics: committed before step.run returned.
            seen[f"{n}-{name}"] = committed(current_run.id, name)
            values.append(value)
        if n % 5 == 0 and not calls[f"retried-{n}"]:
            calls[f"retried-{n}"] += 1
            step.run("flaky", lambda: (_ for _ in ()).throw(OSError("once")))
        return jsonify(values=values)

    server = live_server(app)
    with ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(lambda n: server.post(f"/go/{n}"), range(24)))
    assert [r.status_code for r in responses] == [200] * 24
    for n, r in enumerate(responses):
        assert r.json() == {"values": [f"a{n}", f"b{n}", f"c{n}"]}
        with app.app_context():
            info = durable.get_run(r.headers["Durable-Run-Id"])
        assert info is not None and info.status == "completed"
        assert [s.id for s in info.steps][:3] == ["a", "b", "c"]
    outside.dispose()
    assert len(seen) == 72 and all(seen.values()), seen
