"""Parse the durations and instants that steps and options accept."""

from __future__ import annotations

import re
from datetime import datetime, timedelta, timezone
from typing import TypeAlias

Duration: TypeAlias = "str | int | float | timedelta"

_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0}
# ASCII digits only: "\d" and float() also take "١٢", "1_000" and "1e12".
_NUMBER = re.compile(r"[0-9]+(?:\.[0-9]+)?", re.ASCII)
_PART = re.compile(r"([0-9]+(?:\.[0-9]+)?)(ms|s|m|h|d|w)", re.ASCII)
#: The longest duration accepted: a hundred years, in seconds.
MAX_DURATION = 100 * 365.25 * 86400.0


def parse_duration(value: Duration) -> float:
    """Return a duration in seconds.

    Accepts a number of seconds, a :class:`~datetime.timedelta`, or a string
    made of ``<number><unit>`` parts where unit is ``ms``, ``s``, ``m``,
    ``h``, ``d`` or ``w``: ``"30s"``, ``"5m"``, ``"1h30m"``, ``"2d"``. Numbers
    are ASCII digits with an optional decimal part (no sign, exponent or
    ``_``). A duration is at most a hundred years.

    :raises ValueError: for a malformed, negative, non-finite or longer
        duration (the message shows the value).
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
            raise ValueError(f"empty duration {value!r}")
        if _NUMBER.fullmatch(text):
            seconds = float(text)
        else:
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
                )
    else:
        raise TypeError(f"a duration must be str, number or timedelta, not {value!r}")
    if not 0 <= seconds <= MAX_DURATION:  # also refuses NaN
        raise ValueError(f"a duration must be between 0 and 100 years, got {value!r}")
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
    """Turn a stored POSIX timestamp into an aware UTC datetime (``None``
    for ``None`` or NaN; a time out of range is clamped)."""
    if ts is None or ts != ts:
        return None
    try:
        return datetime.fromtimestamp(ts, tz=timezone.utc)
    except (OverflowError, OSError, ValueError):
        # Beyond what datetime can show (stored by a version that took any
        # duration): the nearest end of its range.
        end = datetime.max if ts > 0 else datetime.min
        return end.replace(tzinfo=timezone.utc)
