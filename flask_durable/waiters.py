"""Wait-URL requests of this process, woken when their run finishes."""

from __future__ import annotations

import threading


class Waiters:
    """Wakes wait-URL requests in this process when a run finishes."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._events: dict[str, list[threading.Event]] = {}

    def subscribe(self, run_id: str) -> threading.Event:
        event = threading.Event()
        with self._lock:
            self._events.setdefault(run_id, []).append(event)
        return event

    def unsubscribe(self, run_id: str, event: threading.Event) -> None:
        with self._lock:
            listeners = self._events.get(run_id)
            if listeners is not None:
                listeners.remove(event)
                if not listeners:
                    del self._events[run_id]

    def notify(self, run_id: str) -> None:
        if run_id not in self._events:  # nobody waits here (most runs)
            return
        with self._lock:
            listeners = list(self._events.get(run_id, ()))
        for event in listeners:
            event.set()
