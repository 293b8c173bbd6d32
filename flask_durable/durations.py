"""Parse the durations and instants that steps and options accept."""

from __future__ import annotations

import re
from datetime import datetime, timedelta, timezone
from typing import TypeAlias

Duration: TypeAlias = "str | int | float | timedelta"

_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0}
_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d|w)")


def parse_duration(value: Duration) -> float:
    """Return a duration in seconds.

    Accepts a number of seconds, a :class:`~datetime.timedelta`, or a string
    made of ``<number><unit>`` parts where unit is ``ms``, ``s``, ``m``,
    ``h``, ``d`` or ``w``: ``"30s"``, ``"5m"``, ``"1h30m"``, ``"2d"``.

    :raises ValueError: for a malformed or negative duration.
    :raises TypeError: for a value of another type.
    """
    if isinstance(value, bool):
        raise TypeError(f"a duration cannot be a bool: {value!r}")
    if isinstance(value, timedelta):
        seconds = value.total_seconds()
    elif isinstance(value, (int, float)):
        seconds = float(value)
    elif isinstance(value, str):
        text = value.strip().lower().replace(" ", "")
        if not text:
            raise ValueError("empty duration")
        try:
            seconds = float(text)
        except ValueError:
            pos = 0
            seconds = 0.0
            for match in _PART.finditer(text):
                if match.start() != pos:
                    break
                seconds += float(match.group(1)) * _UNITS[match.group(2)]
                pos = match.end()
            if pos != len(text) or pos == 0:
                raise ValueError(
                    f"malformed duration {value!r}: use e.g. '30s', '5m', '1h30m', '2d'"
                ) from None
    else:
        raise TypeError(f"a duration must be str, number or timedelta, not {value!r}")
    if seconds != seconds or seconds < 0 or seconds == float("inf"):
        raise ValueError(f"a duration must be finite and >= 0, got {value!r}")
    return seconds


def parse_instant(value: datetime | str) -> float:
    """Return a POSIX timestamp for a :class:`~datetime.datetime` (naive means
    UTC) or an ISO-8601 string.

    :raises ValueError: for a malformed string.
    :raises TypeError: for a value of another type.
    """
    if isinstance(value, str):
        text = value.strip()
        if text.endswith(("Z", "z")):
            text = text[:-1] + "+00:00"
        try:
            value = datetime.fromisoformat(text)
        except ValueError:
            raise ValueError(f"malformed ISO-8601 instant {value!r}") from None
    if not isinstance(value, datetime):
        raise TypeError(f"an instant must be a datetime or ISO-8601 string: {value!r}")
    if value.tzinfo is None:
        value = value.replace(tzinfo=timezone.utc)
    return value.timestamp()


def to_datetime(ts: float | None) -> datetime | None:
    """Turn a stored POSIX timestamp into an aware UTC datetime."""
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, tz=timezone.utc)
