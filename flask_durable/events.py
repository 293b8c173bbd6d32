"""Events: recording them and completing the waits they match."""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Callable
from typing import Any

from .records import WaitSpec
from .serde import dump_json, dump_value
from .store import Store

#: Events deduplicate by id for this long.
DEDUPE_SECONDS = 86400.0

_MISSING = object()


class EventBus:
    """Sends events to the waits of one app.

    :param store: where events and waits live.
    :param wake: resumes a run whose wait an event completed.
    """

    def __init__(self, store: Store, wake: Callable[[str], None]) -> None:
        self.store = store
        self.wake = wake

    def send(self, name: str, data: Any = None, event_id: str | None = None) -> str:
        """See :meth:`flask_durable.Durable.send`."""
        if not isinstance(name, str) or not name or len(name) > 255:
            raise ValueError("an event name must be a string of 1 to 255 characters")
        if event_id is None:
            event_id = secrets.token_hex(16)
        elif not isinstance(event_id, str) or not event_id or len(event_id) > 128:
            raise ValueError("an event id must be a string of 1 to 128 characters")
        if data is None:
            data = {}
        try:
            data_text = dump_json(data)
        except (TypeError, ValueError) as e:
            raise TypeError(f"event data must be JSON-serializable: {e}") from None
        ts = time.time()
        if not self.store.insert_event(event_id, name, data_text, ts, DEDUPE_SECONDS):
            return event_id
        event = {"name": name, "data": data, "id": event_id, "ts": int(ts * 1000)}
        for wait in self.store.waits_for(name, ts):
            if matches(json.loads(wait.match), event):
                self._deliver(wait.run_id, wait.step_id, event)
        return event_id

    def _deliver(self, run_id: str, step_id: str, event: dict[str, Any]) -> None:
        if self.store.deliver(run_id, step_id, dump_value(event)):
            self.wake(run_id)

    def catch_up(self, run_id: str, wait: WaitSpec) -> None:
        """Deliver an event that arrived while the wait was being stored."""
        match = json.loads(wait.match)
        for row in self.store.events_since(wait.event, wait.since, time.time() + 1):
            event = {
                "name": row.name,
                "data": json.loads(row.data),
                "id": row.id,
                "ts": int(row.ts * 1000),
            }
            if matches(match, event):
                self._deliver(run_id, wait.step_id, event)
                return


def matches(match: dict[str, Any], event: dict[str, Any]) -> bool:
    """Whether every dotted path of ``match`` equals the event's field."""
    for path, expected in match.items():
        value: Any = event
        for part in path.split("."):
            if isinstance(value, dict):
                value = value.get(part, _MISSING)
            elif isinstance(value, list) and part.isdigit() and int(part) < len(value):
                value = value[int(part)]
            else:
                value = _MISSING
            if value is _MISSING:
                return False
        if value != expected or isinstance(value, bool) != isinstance(expected, bool):
            return False
    return True
