"""DURABLE_GROUP_COMMIT: concurrent sync checkpoints share transactions and
each request still waits for its own commit."""

from __future__ import annotations

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
