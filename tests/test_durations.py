"""Durations and instants: ``parse_duration`` and ``parse_instant``."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from typing import Any

import pytest

from flask_durable.durations import parse_duration, parse_instant


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("30s", 30),
        ("5m", 300),
        ("1h30m", 5400),
        ("2d", 172800),
        ("1.5s", 1.5),
        ("250ms", 0.25),
        (" 1h 5s ", 3605),
        ("42", 42),
        (7, 7),
        (0.5, 0.5),
        (timedelta(minutes=2), 120),
    ],
)
def test_parse_duration(value: Any, seconds: float) -> None:
    assert parse_duration(value) == pytest.approx(seconds)


@pytest.mark.parametrize("value", ["", "ten", "5x", "s", "1h-5m", "-3s", -1, "1e999"])
def test_parse_duration_rejects(value: Any) -> None:
    with pytest.raises(ValueError):
        parse_duration(value)


@pytest.mark.parametrize("value", [None, True, [1], object()])
def test_parse_duration_type_errors(value: Any) -> None:
    with pytest.raises(TypeError):
        parse_duration(value)


def test_parse_instant() -> None:
    aware = datetime(2030, 1, 2, 3, 4, 5, tzinfo=timezone.utc)
    assert parse_instant(aware) == aware.timestamp()
    assert parse_instant(datetime(2030, 1, 2, 3, 4, 5)) == aware.timestamp()
    assert parse_instant("2030-01-02T03:04:05Z") == aware.timestamp()
    assert parse_instant("2030-01-02T04:04:05+01:00") == aware.timestamp()
    with pytest.raises(ValueError):
        parse_instant("tomorrow")
    with pytest.raises(TypeError):
        parse_instant(5)  # type: ignore[arg-type]
