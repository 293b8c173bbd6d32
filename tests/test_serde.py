"""Values as steps store them: what round-trips, what cannot be stored, and
a first execution that returns what a replay would."""

from __future__ import annotations

import uuid
from datetime import datetime, timezone
from typing import Any

import pytest
from flask import jsonify

from flask_durable import Durable, step
from flask_durable.serde import dump_value, load_value

durable = Durable()


@pytest.mark.parametrize(
    "value",
    [
        None,
        True,
        3,
        2.5,
        "text",
        [1, "a", None],
        (1, 2, (3,)),
        b"\x00\xff",
        uuid.UUID(int=5),
        datetime(2030, 1, 2, 3, 4, 5, 678901, tzinfo=timezone.utc),
        datetime(2030, 1, 2, 3, 4, 5, 6),
        {"nested": {"t": (1, b"x")}, " t": "looks like a tag"},
    ],
)
def test_values_round_trip(value: Any) -> None:
    assert load_value(dump_value(value)) == value
    assert type(load_value(dump_value(value))) is type(value)


@pytest.mark.parametrize("value", [{1, 2}, object(), {"k": object()}, 1j])
def test_unstorable_values_are_type_errors(value: Any) -> None:
    with pytest.raises(TypeError):
        dump_value(value)


def test_first_run_returns_round_tripped_value(make_app: Any) -> None:
    app = make_app()
    seen: list[Any] = []

    @app.get("/")
    @durable.endpoint
    def view() -> Any:
        value = step.run("v", lambda: (1, [2], datetime(2030, 1, 1)))
        seen.append(value)
        return "ok"

    app.test_client().get("/")
    assert seen == [(1, [2], datetime(2030, 1, 1))]
    assert isinstance(seen[0], tuple)


def test_non_serializable_step_value_names_the_step(make_app: Any) -> None:
    app = make_app()

    @app.get("/")
    @durable.endpoint
    def view() -> Any:
        try:
            step.run("make-set", lambda: {1, 2})
        except TypeError as e:
            return jsonify(error=str(e)), 500
        return "no"

    r = app.test_client().get("/")
    assert r.status_code == 500
    assert "'make-set'" in r.json["error"]
