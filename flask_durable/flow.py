"""Flow control (SPEC 10): concurrency, throttle and rate limits on
endpoints and functions, holding across every process that shares the
database.

A run under a concurrency or throttle limit carries a *flow key* (the
endpoint's or function's id and the value of its key expression). The
ordinary claims skip such runs; they are started by admission
(:meth:`Store.admit <flask_durable.store.base.Store.admit>`), which, under
a lock on the key, counts the key's executing runs (a sleeping or waiting
run does not count, nor one whose process died and whose lease expired) and
takes the throttle's allowance, then claims the oldest due runs of the key
that fit. Throttle and rate limits use GCRA: one start per ``period /
limit`` seconds, ``burst`` at once.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .durations import parse_duration

#: A key expression compiled to a callable (of the request for endpoints,
#: of the event for functions).
KeyFn = Callable[..., Any]


@dataclass(frozen=True)
class Rate:
    """``limit`` starts per ``period`` seconds, ``burst`` at once."""

    limit: int
    period: float
    burst: int

    @property
    def gcra(self) -> tuple[float, int]:
        """``(interval, burst)`` as the store takes them."""
        return self.period / self.limit, self.burst


@dataclass(frozen=True)
class FlowControl:
    """The limits of one endpoint or function (``None``: no such limit).

    The concurrency and throttle limits share one key (the run's flow key);
    the rate limit may have its own.
    """

    scope: str
    concurrency: int | None = None
    throttle: Rate | None = None
    key: KeyFn | None = None
    rate_limit: Rate | None = None
    rate_key: KeyFn | None = None

    @property
    def queues(self) -> bool:
        """Whether runs may wait in a queue (concurrency or throttle)."""
        return self.concurrency is not None or self.throttle is not None

    @property
    def admission(self) -> tuple[int | None, tuple[float, int] | None]:
        """What :meth:`Store.admit` takes for this scope."""
        return self.concurrency, None if self.throttle is None else self.throttle.gcra

    def flow_key(self, *args: Any) -> str:
        """The flow key of a run: the scope and its key's value."""
        return _key(self.scope, self.key, args)

    def rate_key_of(self, *args: Any) -> str:
        """The key of the rate limit's state."""
        return "rate\x1f" + _key(self.scope, self.rate_key, args)


def _key(scope: str, fn: KeyFn | None, args: tuple[Any, ...]) -> str:
    if fn is None:
        return scope
    value = fn(*args)
    text = value if isinstance(value, str) else repr(value)
    key = f"{scope}\x1f{text}"
    if len(key) > 200 or "\x00" in key:
        key = (
            f"{scope}\x1f#" + hashlib.sha256(key.encode("utf-8", "replace")).hexdigest()
        )
    return key


def _int(owner: str, what: str, value: Any, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(
            f"{owner}: {what} must be an integer >= {minimum}, not {value!r}"
        )
    return value


def _rate(
    owner: str, what: str, spec: Any, compile_key: Callable[[Any, str], KeyFn]
) -> tuple[Rate, KeyFn | None]:
    allowed = {"limit", "period", "key"} | ({"burst"} if what == "throttle" else set())
    if not isinstance(spec, dict) or set(spec) - allowed or "period" not in spec:
        raise ValueError(
            f"{owner}: {what} is {{'limit': n, 'period': duration, 'key': ...}},"
            f" not {spec!r}"
        )
    limit = _int(owner, f"{what} limit", spec.get("limit"))
    try:
        period = parse_duration(spec["period"])
    except (TypeError, ValueError) as e:
        raise ValueError(f"{owner}: {what} period: {e}") from None
    if period <= 0:
        raise ValueError(f"{owner}: {what} period must be positive")
    burst = (
        _int(owner, f"{what} burst", spec.get("burst", 1))
        if what == "throttle"
        else limit
    )
    key = spec.get("key")
    return Rate(limit, period, burst), None if key is None else compile_key(
        key, f"{what} key"
    )


def parse_flow(
    owner: str,
    scope: str,
    concurrency: Any,
    throttle: Any,
    rate_limit: Any,
    compile_key: Callable[[Any, str], KeyFn],
) -> FlowControl | None:
    """The limits of ``@durable.endpoint`` or ``@durable.function``'s
    options, checked (``None`` when there are none).

    :param owner: names the endpoint or function in errors.
    :param compile_key: turns a key option into a callable.
    :raises ValueError: a bad option.
    """
    if concurrency is None and throttle is None and rate_limit is None:
        return None
    limit = key = None
    if concurrency is not None:
        if isinstance(concurrency, list):
            if len(concurrency) != 1:
                raise ValueError(
                    f"{owner}: one concurrency limit per endpoint or function is"
                    " supported (combine keys into one expression)"
                )
            concurrency = concurrency[0]
        if isinstance(concurrency, dict):
            if set(concurrency) - {"limit", "key"}:
                raise ValueError(
                    f"{owner}: concurrency is n or {{'limit': n, 'key': ...}},"
                    f" not {concurrency!r}"
                )
            limit = _int(owner, "concurrency limit", concurrency.get("limit"))
            if concurrency.get("key") is not None:
                key = compile_key(concurrency["key"], "concurrency key")
        else:
            limit = _int(owner, "concurrency", concurrency)
    rate = None
    if throttle is not None:
        rate, throttle_key = _rate(owner, "throttle", throttle, compile_key)
        if (
            key is not None
            and throttle_key is not None
            and throttle.get("key")
            != (concurrency.get("key") if isinstance(concurrency, dict) else None)
        ):
            raise ValueError(f"{owner}: concurrency and throttle must use the same key")
        key = key or throttle_key
    limited, rate_key = (None, None)
    if rate_limit is not None:
        limited, rate_key = _rate(owner, "rate_limit", rate_limit, compile_key)
    return FlowControl(
        scope=scope,
        concurrency=limit,
        throttle=rate,
        key=key,
        rate_limit=limited,
        rate_key=rate_key,
    )
