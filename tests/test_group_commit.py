"""DURABLE_GROUP_COMMIT: concurrent sync checkpoints share transactions and
each request still waits for its own commit."""

from __future__ import annotations

from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from flask import jsonify

from flask_durable import Durable, step

durable = Durable()


@pytest.fixture
def db_url(any_db_url: str) -> str:
    return any_db_url


def test_group_commit_under_concurrency(make_app: Any, live_server: Any) -> None:
    app = make_app(DURABLE_GROUP_COMMIT=True)
    calls: Counter[str] = Counter()
    seen: dict[str, Any] = {}

    @app.post("/go/<int:n>")
    @durable.endpoint
    def go(n: int) -> Any:
        values = []
        for name in ("a", "b", "c"):
            value = step.run(name, lambda name=name: f"{name}{n}")
            # Sync semantics: committed before step.run returned.
            with app.app_context():
                info = durable.get_run(current_id())
            seen[f"{n}-{name}"] = info is not None and name in [
                s.id for s in info.steps
            ]
            values.append(value)
        if n % 5 == 0 and not calls[f"retried-{n}"]:
            calls[f"retried-{n}"] += 1
            step.run("flaky", lambda: (_ for _ in ()).throw(OSError("once")))
        return jsonify(values=values)

    def current_id() -> str:
        from flask_durable import current_run

        return current_run.id

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
    assert all(seen.values())
