"""``step.parallel`` over real HTTP: branches run at once, a failing branch
is retried alone, one failing for good raises ``StepError``."""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest
from suspend_app import build


@pytest.fixture
def db_url(any_db_url: str) -> str:
    """Every test here runs on SQLite and on PostgreSQL."""
    return any_db_url


def test_parallel_branches_run_concurrently(make_app: Any, live_server: Any) -> None:
    app, calls = build(make_app)
    server = live_server(app)
    r = server.post("/parallel")
    assert r.status_code == 200
    assert r.json()["results"] == ["X", "Y", "Z"]
    assert r.json()["took"] < 1.4  # three 0.5 s steps at once, not in a row
    assert calls == Counter(x=1, y=1, z=1)


def test_parallel_failing_branch_retried_alone(make_app: Any, live_server: Any) -> None:
    app, calls = build(make_app)
    server = live_server(app)
    r = server.post("/parallel?fail=y", allow_redirects=False)
    assert r.status_code == 303
    final = server.get(r.headers["Location"])
    assert final.json()["results"] == ["X", "Y", "Z"]
    assert calls == Counter(x=1, y=2, z=1)


def test_parallel_branch_failing_for_good_raises_step_error(
    make_app: Any, live_server: Any
) -> None:
    app, calls = build(make_app)
    server = live_server(app)
    r = server.post("/parallel-fatal")
    assert r.status_code == 500
    assert r.json() == {"failed": "bad", "ok_calls": 1}
