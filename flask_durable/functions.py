"""Durable functions: runs started by events and cron ticks rather than by a
request (SPEC 9).

A function is served by the same engine as an endpoint. Each function gets
an internal route, ``<prefix>/_functions/<id>``, that answers only replays
(a request from outside gets ``404``): starting a function run stores a
request to that route, with the triggering event as its body, as a run due
now, and the scheduler of any process that registered the function claims
and replays it. Steps, retries, sleeps, waits, leases and recovery are those
of endpoints.

Exactly once: a run started by an event has an id derived from the
function's id and the event's id, and one started by a cron tick an id
derived from the tick; inserting a run whose id exists does nothing. So an
event sent again starts nothing, and of all the processes that see a tick
only one run starts.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from io import BytesIO
from typing import Any

from werkzeug.test import EnvironBuilder

#: The path of a function's internal route, below the URL prefix.
FUNCTION_PATH = "/_functions/"
#: The name of the event a cron tick starts a run with.
TIMER_EVENT = "durable/scheduled.timer"
#: The event a run started by ``step.invoke`` gets.
INVOKED_EVENT = "durable/function.invoked"
#: The event that tells an invoking run its child ended (data: ``run_id``,
#: ``status``, ``output``, ``error``).
FINISHED_EVENT = "durable/function.finished"
#: Most ticks started at once for ticks missed while no process ran.
MAX_CATCH_UP = 100

#: What an expression is compiled to: the event in, a value out.
Expression = Callable[[dict[str, Any]], Any]


class ExpressionError(ValueError):
    """A malformed expression (raised at registration, naming the
    function)."""


def compile_expression(
    source: Any, function_id: str, what: str, names: tuple[str, ...] = ("event",)
) -> Callable[..., Any]:
    """A CEL string over ``event``, compiled once, or a Python callable
    taking the event, as a callable taking the event.

    :raises ExpressionError: the string does not parse, or is neither a
        string nor a callable.
    """
    if callable(source):
        return source
    if not isinstance(source, str) or not source.strip():
        raise ExpressionError(
            f"function {function_id!r}: {what} must be a CEL expression (a"
            f" string) or a callable taking the event, not {source!r}"
        )
    import cel

    try:
        program = cel.compile(source)
    except ValueError as e:
        raise ExpressionError(
            f"function {function_id!r}: {what} {source!r} is not valid CEL: {e}"
        ) from None

    def evaluate(*values: dict[str, Any]) -> Any:
        return program.execute(dict(zip(names, values, strict=True)))

    evaluate.__qualname__ = f"cel({source!r})"
    return evaluate


#: The step id of the wait a ``cancel_on`` rule is stored as (no step of a
#: view can take it: a step id starting with ``\x1f`` is refused).
CANCEL_PREFIX = "\x1fcancel_on:"


@dataclass(frozen=True)
class CancelRule:
    """One ``cancel_on`` entry: an incoming event named ``event`` cancels
    the run when its field at the dotted path ``match`` equals the
    triggering event's, and ``if_`` (over ``event`` and ``async``, the
    incoming one) is true."""

    event: str
    match: str | None = None
    if_: Callable[[dict[str, Any], dict[str, Any]], Any] | None = None

    def wait_match(self, trigger: dict[str, Any]) -> dict[str, Any] | None:
        """The ``match`` of the wait this rule is stored as for a run
        started by ``trigger``, or ``None`` if the path is not in it."""
        if self.match is None:
            return {}
        value: Any = trigger
        for part in self.match.split("."):
            if not isinstance(value, dict) or part not in value:
                return None
            value = value[part]
        return {self.match: value}


def make_cancel_rules(function_id: str, specs: Any) -> tuple[CancelRule, ...]:
    """``cancel_on``'s entries, checked.

    :raises ValueError: a bad entry, naming the function.
    """
    rules = []
    for spec in specs or ():
        if (
            not isinstance(spec, dict)
            or set(spec) - {"event", "match", "if"}
            or not isinstance(spec.get("event"), str)
            or not spec["event"]
            or not isinstance(spec.get("match", ""), str)
        ):
            raise ValueError(
                f"function {function_id!r}: a cancel_on entry is {{'event': name,"
                f" 'match': 'data.path', 'if': expression}}, not {spec!r}"
            )
        condition = spec.get("if")
        rules.append(
            CancelRule(
                event=spec["event"],
                match=spec.get("match") or None,
                if_=None
                if condition is None
                else compile_expression(
                    condition, function_id, "cancel_on if", ("event", "async")
                ),
            )
        )
    return tuple(rules)


@dataclass(frozen=True)
class Trigger:
    """What starts a function: an event name (with an optional filter) or
    a cron line (with an optional ``TZ=<zone>`` prefix)."""

    event: str | None = None
    cron: str | None = None
    if_: Expression | None = None
    #: The cron line without its ``TZ=`` prefix, and the zone.
    crontab: str | None = None
    zone: str | None = None


def parse_cron(line: str, function_id: str) -> tuple[str, str | None]:
    """``"TZ=Europe/Paris 0 2 * * *"`` -> ``("0 2 * * *", "Europe/Paris")``;
    the line is checked with APScheduler's parser.

    :raises ValueError: a bad line or zone, naming the function.
    """
    from apscheduler.triggers.cron import CronTrigger

    text = line.strip()
    zone = None
    if text.startswith(("TZ=", "CRON_TZ=")):
        first, _, text = text.partition(" ")
        zone = first.split("=", 1)[1]
    try:
        CronTrigger.from_crontab(text.strip(), timezone=zone or "UTC")
    except Exception as e:  # APScheduler raises ValueError or zone errors
        raise ValueError(
            f"function {function_id!r}: bad cron line {line!r}: {e}"
        ) from None
    return text.strip(), zone


@dataclass
class DurableFunction:
    """A function registered with :meth:`Durable.function
    <flask_durable.Durable.function>`. Calling it calls the function
    directly (not durably), for tests."""

    id: str
    fn: Callable[[dict[str, Any]], Any]
    triggers: tuple[Trigger, ...]
    retries: int | None = None
    idempotency: Expression | None = None
    timeout_seconds: float | None = None
    cancel_on: tuple[CancelRule, ...] = ()
    #: Seconds a run may wait before it starts (``timeouts["start"]``).
    start_seconds: float | None = None
    #: Concurrency, throttle and rate limits.
    flow: Any = None
    #: ``(max_size, timeout)`` of ``batch_events``: the function gets a
    #: list of events.
    batch: tuple[int, float] | None = None
    #: ``(period, timeout or None, key or None)`` of ``debounce``.
    debounce: tuple[float, float | None, Any] | None = None
    #: Seconds ahead in its queue a run of an event goes (``priority``).
    priority: Callable[[dict[str, Any]], Any] | None = None
    #: The event names that start it.
    events: frozenset[str] = field(init=False)

    def __post_init__(self) -> None:
        self.events = frozenset(t.event for t in self.triggers if t.event)

    def __call__(self, event: Any) -> Any:
        return self.fn(event)

    @property
    def crons(self) -> tuple[Trigger, ...]:
        return tuple(t for t in self.triggers if t.crontab)

    def wants(self, event: dict[str, Any]) -> bool:
        """Whether ``event`` starts a run of this function."""
        for trigger in self.triggers:
            if trigger.event != event["name"]:
                continue
            if trigger.if_ is None or trigger.if_(event) is True:
                return True
        return False

    def run_id(self, app_id: str, event: dict[str, Any]) -> str:
        """The id of the run ``event`` starts: the same for the same event
        (or, with ``idempotency``, the same key)."""
        if self.idempotency is not None:
            basis = "key\0" + json.dumps(self.idempotency(event), sort_keys=True)
        else:
            basis = "event\0" + str(event["id"])
        digest = hashlib.sha256(f"{app_id}\0{self.id}\0{basis}".encode())
        return digest.hexdigest()[:32]


def make_triggers(
    function_id: str,
    event: str | Sequence[str] | None,
    cron: str | None,
    triggers: Sequence[dict[str, Any]] | None,
    if_: Any,
) -> tuple[Trigger, ...]:
    """The triggers of ``@durable.function``'s arguments, checked.

    :raises ValueError: no trigger, or a bad one.
    """
    specs: list[dict[str, Any]] = []
    if event is not None:
        names = [event] if isinstance(event, str) else list(event)
        specs += [{"event": n, "if": if_} for n in names]
    elif if_ is not None:
        raise ValueError(f"function {function_id!r}: if_ needs event=")
    if cron is not None:
        specs.append({"cron": cron})
    specs += list(triggers or ())
    if not specs:
        raise ValueError(
            f"function {function_id!r} has no trigger: give event=, cron= or triggers="
        )
    out = []
    for spec in specs:
        if not isinstance(spec, dict) or set(spec) - {"event", "cron", "if"}:
            raise ValueError(
                f"function {function_id!r}: a trigger is {{'event': name, 'if':"
                f" expression}} or {{'cron': line}}, not {spec!r}"
            )
        name, line = spec.get("event"), spec.get("cron")
        if (name is None) == (line is None):
            raise ValueError(
                f"function {function_id!r}: a trigger has an event or a cron,"
                f" not {spec!r}"
            )
        if name is not None:
            if not isinstance(name, str) or not 1 <= len(name) <= 255:
                raise ValueError(f"function {function_id!r}: bad event name {name!r}")
            condition = spec.get("if")
            out.append(
                Trigger(
                    event=name,
                    if_=None
                    if condition is None
                    else compile_expression(condition, function_id, "if"),
                )
            )
        else:
            if not isinstance(line, str):
                raise ValueError(f"function {function_id!r}: bad cron {line!r}")
            crontab, zone = parse_cron(line, function_id)
            out.append(Trigger(cron=line, crontab=crontab, zone=zone))
    return tuple(out)


def function_request(
    prefix: str,
    function_id: str,
    event: dict[str, Any],
    start_by: float | None = None,
) -> Any:
    """The WSGI environ of the request a function run replays, and its
    body: the event, and when the run must have started by."""
    payload: dict[str, Any] = {"event": event}
    if start_by is not None:
        payload["start_by"] = start_by
    body = json.dumps(payload, separators=(",", ":")).encode()
    builder = EnvironBuilder(
        path=prefix + FUNCTION_PATH + function_id,
        method="POST",
        base_url="http://localhost/",
        input_stream=BytesIO(body),
        content_type="application/json",
        content_length=len(body),
    )
    try:
        environ = builder.get_environ()
    finally:
        builder.close()
    return environ, body


def tick_event(function_id: str, at: datetime) -> dict[str, Any]:
    """The event a cron tick at ``at`` starts a run with."""
    stamp = at.astimezone(timezone.utc)
    return {
        "name": TIMER_EVENT,
        "data": {"cron": True, "function_id": function_id},
        "id": f"cron:{function_id}:{stamp.isoformat()}",
        "ts": int(stamp.timestamp() * 1000),
    }


def cron_key(app_id: str, function_id: str, crontab: str, zone: str | None) -> str:
    """The database meta key recording when a cron trigger was first
    served (ticks are never caught up from before it)."""
    basis = f"{app_id}\0{function_id}\0{zone}\0{crontab}"
    return "cron:" + hashlib.sha256(basis.encode()).hexdigest()[:40]


class CronClock:
    """The ticks of one cron trigger, each handed out once by this process
    (other processes hand out the same ticks: run ids make them one run).

    :param since: ticks at or before this instant are not handed out.
    """

    def __init__(self, crontab: str, zone: str | None, since: datetime) -> None:
        from apscheduler.triggers.cron import CronTrigger

        self.trigger = CronTrigger.from_crontab(crontab, timezone=zone or "UTC")
        self.last = since

    def due(self, now: datetime) -> list[datetime]:
        """The ticks after the last one handed out, up to ``now``: the
        newest :data:`MAX_CATCH_UP` of them."""
        ticks: list[datetime] = []
        tick = self.trigger.get_next_fire_time(None, self.last + _EPSILON)
        while tick is not None and tick <= now:
            ticks.append(tick)
            tick = self.trigger.get_next_fire_time(tick, tick + _EPSILON)
        if ticks:
            self.last = ticks[-1]
        return ticks[-MAX_CATCH_UP:]


_EPSILON = timedelta(microseconds=1)
