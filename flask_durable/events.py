"""Events: recording them and completing the waits they match."""

from __future__ import annotations

import math
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from . import clock
from .crypto import EVENT_CONTEXT, STEP_CONTEXT, Cipher, is_sealed_text
from .functions import CANCEL_PREFIX
from .records import WaitSpec
from .serde import dump_json, dump_value, is_storable_text, load_json
from .store import Store

#: Events deduplicate by id for this long.
DEDUPE_SECONDS = 86400.0
#: The deepest nesting of containers an event's data may have.
MAX_DEPTH = 64

_MISSING = object()


class EventTooLarge(ValueError):
    """An event over the size limit (``413`` on the events route)."""


@dataclass(frozen=True, slots=True)
class Event:
    """An event checked by :meth:`EventBus.check`, ready to be stored.

    :ivar data: the data as JSON gives it back (what every waiter sees).
    :ivar data_text: the data as stored.
    :ivar output: the whole event as delivered (the output of a waiting
        step).
    """

    id: str
    name: str
    data: Any
    ts: float
    data_text: str
    output: str

    def as_dict(self) -> dict[str, Any]:
        """The event as :func:`matches` and a waiting step see it."""
        return _as_dict(self.name, self.data, self.id, self.ts)


class EventBus:
    """Sends events to the waits of one app.

    :param store: where events and waits live.
    :param wake: resumes a run whose wait an event completed.
    :param max_size: the largest event (UTF-8 JSON bytes, as delivered).
    :param max_size_key: the setting ``max_size`` comes from (for errors).
    :param cipher: opens sealed event data; with ``seal`` also seals the
        data stored and the outputs delivered (``DURABLE_ENCRYPT_PAYLOADS``).
    """

    def __init__(
        self,
        store: Store,
        wake: Callable[[str], None],
        max_size: int,
        max_size_key: str = "DURABLE_MAX_EVENT_SIZE",
        cipher: Cipher | None = None,
        seal: bool = False,
        cancel: Callable[[str, str, dict[str, Any]], None] | None = None,
    ) -> None:
        self.store = store
        self.wake = wake
        #: Called with ``(run_id, step_id, event)`` for a matched wait that
        #: stands for a function's ``cancel_on`` rule.
        self.cancel = cancel
        self.cipher = cipher
        self.seal = seal and cipher is not None
        self.max_size = max_size
        self.max_size_key = max_size_key

    def send(self, name: str, data: Any = None, event_id: str | None = None) -> str:
        """See :meth:`flask_durable.Durable.send`."""
        return self.send_many([self.check(name, data, event_id)])[0]

    def check(self, name: Any, data: Any = None, event_id: Any = None) -> Event:
        """Validate and encode one event; nothing is stored.

        :raises EventTooLarge: over the size limit.
        :raises ValueError: a bad name or id; data nested deeper than
            :data:`MAX_DEPTH`, holding a lone surrogate or NUL in a string
            or key, or a non-finite number.
        :raises TypeError: data that is not JSON-serializable.
        """
        if not isinstance(name, str) or not 1 <= len(name) <= 255:
            raise ValueError("an event name must be a string of 1 to 255 characters")
        if not is_storable_text(name):
            raise ValueError("an event name cannot hold NUL or a lone surrogate")
        if event_id is None:
            event_id = secrets.token_hex(16)
        elif not isinstance(event_id, str) or not 1 <= len(event_id) <= 128:
            raise ValueError("an event id must be a string of 1 to 128 characters")
        elif not is_storable_text(event_id):
            raise ValueError("an event id cannot hold NUL or a lone surrogate")
        if data is None:
            data = {}
        problem = _data_problem(data)
        if problem is not None:
            raise ValueError(f"event data {problem}")
        try:
            data_text = dump_json(data)
        except (TypeError, ValueError) as e:
            raise TypeError(f"event data must be JSON-serializable: {e}") from None
        data = load_json(data_text)  # what a waiter gets, after any restart
        ts = clock.now()
        output = dump_value(_as_dict(name, data, event_id, ts))
        size = len(output.encode("utf-8"))
        if size > self.max_size:
            raise EventTooLarge(
                f"the event is {size} bytes, over {self.max_size_key} ({self.max_size})"
            )
        return Event(event_id, name, data, ts, data_text, output)

    def send_many(self, events: Sequence[Event]) -> list[str]:
        """Store checked events in one transaction (all or none), then
        deliver each one that is not a duplicate to the waits it matches.

        :returns: the event ids.
        """
        rows = [
            (e.id, e.name, self._sealed(e.data_text, EVENT_CONTEXT), e.ts)
            for e in events
        ]
        stored = self.store.insert_events(rows, DEDUPE_SECONDS)
        fresh = [e for e, new in zip(events, stored, strict=True) if new]
        if not fresh:
            return [e.id for e in events]
        # One query for the whole batch, then each event's own waits.
        found = self.store.waits_for_many(
            sorted({e.name for e in fresh}),
            min(e.ts for e in fresh),
            max(e.ts for e in fresh),
        )
        taken: set[tuple[str, str]] = set()  # a wait takes one event
        for event in fresh:
            as_dict = event.as_dict()
            for wait in found:
                if (
                    wait.event != event.name
                    or not wait.since <= event.ts < wait.expires_at
                    or (wait.run_id, wait.step_id) in taken
                ):
                    continue
                if matches(load_json(wait.match), as_dict):
                    if wait.step_id.startswith(CANCEL_PREFIX):
                        if self.cancel is not None:
                            self.cancel(wait.run_id, wait.step_id, as_dict)
                        continue
                    taken.add((wait.run_id, wait.step_id))
                    self._deliver(wait.run_id, wait.step_id, event.output)
        return [e.id for e in events]

    def _sealed(self, text: str, context: bytes) -> str:
        if self.seal and self.cipher is not None:
            return self.cipher.encrypt_text(text, context)
        return text

    def _data(self, text: str) -> Any:
        if is_sealed_text(text) and self.cipher is not None:
            text = self.cipher.decrypt_text(text, EVENT_CONTEXT)
        return load_json(text)

    def _deliver(self, run_id: str, step_id: str, output: str) -> None:
        output = self._sealed(output, STEP_CONTEXT)
        if self.store.deliver(run_id, step_id, output):
            self.wake(run_id)

    def catch_up(self, run_id: str, wait: WaitSpec) -> None:
        """Deliver an event that arrived while the wait was being stored."""
        match = load_json(wait.match)
        for row in self.store.events_since(wait.event, wait.since, clock.now() + 1):
            event = _as_dict(row.name, self._data(row.data), row.id, row.ts)
            if matches(match, event):
                self._deliver(run_id, wait.step_id, dump_value(event))
                return


def _as_dict(name: str, data: Any, event_id: str, ts: float) -> dict[str, Any]:
    return {"name": name, "data": data, "id": event_id, "ts": int(ts * 1000)}


def _data_problem(data: Any) -> str | None:
    """What keeps ``data`` from being stored and read back as it is, or
    ``None``. Walks without recursion (any depth, even a cycle, is safe)."""
    stack: list[tuple[Any, int]] = [(data, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, str):
            if not is_storable_text(value):
                return "cannot hold NUL or a lone surrogate"
        elif isinstance(value, float):
            if not math.isfinite(value):
                return "cannot hold a non-finite number"
        elif isinstance(value, (dict, list, tuple)):
            if depth > MAX_DEPTH:
                return f"is nested deeper than {MAX_DEPTH} levels"
            if isinstance(value, dict):
                for key in value:
                    if isinstance(key, str) and not is_storable_text(key):
                        return "cannot hold NUL or a lone surrogate (in a key)"
                value = value.values()
            stack.extend((item, depth + 1) for item in value)
    return None


def matches(match: dict[str, Any], event: dict[str, Any]) -> bool:
    """Whether every dotted path of ``match`` equals the event's field."""
    for path, expected in match.items():
        value: Any = event
        for part in path.split("."):
            if isinstance(value, dict):
                value = value.get(part, _MISSING)
            elif isinstance(value, list) and _is_index(part, len(value)):
                value = value[int(part)]
            else:
                value = _MISSING
            if value is _MISSING:
                return False
        if value != expected or isinstance(value, bool) != isinstance(expected, bool):
            return False
    return True


def _is_index(part: str, size: int) -> bool:
    """Whether a path part is an index of a list of ``size`` items: ASCII
    digits only (``"²".isdigit()`` is true, yet ``int("²")`` fails)."""
    return part.isascii() and part.isdigit() and len(part) < 10 and int(part) < size
