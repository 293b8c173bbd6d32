"""Streaming (SPEC 11): what ``step.stream`` publishes, stored as the run's
stream, and the ``text/event-stream`` that replays it to clients.

Every event is stored (``durable_chunks``) before it is announced, with a
``seq`` increasing per run, which is its SSE ``id``. A reader sends what is
stored after the last id it has (``Last-Event-ID``), then waits to be told
of more: in the same process at once, in another process by PostgreSQL's
``NOTIFY`` or, on SQLite, by polling. So a client may join late, reconnect,
or read from a process other than the one running the view, and sees every
event once, in order; the run's final response comes last as ``result``.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from .records import TERMINAL_STATUSES
from .responses import decode_response
from .waiters import Waiters

if TYPE_CHECKING:
    from .store import Store

#: Seconds between ``: keep-alive`` comments on an idle stream.
KEEPALIVE = 15.0


class Publisher:
    """Publishes the stream events of one run from the process that holds
    its lease (one writer at a time)."""

    def __init__(self, store: Store, streams: Waiters, run_id: str) -> None:
        self.store = store
        self.streams = streams
        self.run_id = run_id
        self._seq: int | None = None
        #: Steps that published since their last ``reset``.
        self._open: set[str | None] = set()
        self._lock = threading.Lock()

    def _load(self) -> None:
        """Read what the run published before this execution (once)."""
        self._seq = 1
        self._open = set()
        while True:
            rows = self.store.stream_events(self.run_id, self._seq - 1, 1000)
            for row in rows:
                self._seq = row.seq + 1
                step = json.loads(row.data).get("step")
                if row.kind == "reset":
                    self._open.discard(step)
                elif row.kind == "step" or row.kind == "chunk":
                    self._open.add(step)
            if len(rows) < 1000:
                return

    def begin_step(self, step_id: str) -> None:
        """A streaming step starts: ``reset`` first if an earlier attempt
        (in a process that died) published for it, then ``running``."""
        with self._lock:
            if self._seq is None:
                self._load()
            again = step_id in self._open
        if again:
            self.publish("reset", {"step": step_id})
        self.publish("step", {"step": step_id, "status": "running"})

    def publish(self, kind: str, data: Any) -> None:
        text = json.dumps(data, separators=(",", ":"), default=repr)
        with self._lock:
            if self._seq is None:
                self._load()
            assert self._seq is not None
            seq = self._seq
            self._seq += 1
            self.store.publish(self.run_id, seq, kind, text)
            step = data.get("step") if isinstance(data, dict) else None
            if kind == "reset":
                self._open.discard(step)
            else:
                self._open.add(step)
        self.streams.notify(self.run_id)


def sse(event: str, data: str, event_id: int) -> str:
    """One server-sent event."""
    lines = "".join(f"data: {line}\n" for line in data.split("\n"))
    return f"id: {event_id}\nevent: {event}\n{lines}\n"


def read_stream(
    store: Store,
    streams: Waiters,
    run_id: str,
    after: int,
    poll: float,
    open_stored: Any,
) -> Iterator[str]:
    """The run's stream from ``after`` on, live, ending with ``result``
    once the run is finished and every event before it was sent."""
    last = after
    idle = 0.0
    yield "retry: 1000\n\n"
    while True:
        listener = streams.subscribe(run_id)
        try:
            # The final state first: events stored before it are all read
            # below, so nothing published before the end is missed.
            final = store.get_final(run_id)
            if final is None:
                yield sse("error", json.dumps({"error": "unknown run"}), last + 1)
                return
            rows = store.stream_events(run_id, last)
            for row in rows:
                last = row.seq
                yield sse(row.kind, row.data, row.seq)
            if rows:
                idle = 0.0
                continue
            if final.status in TERMINAL_STATUSES and final.response is not None:
                status, headers, body = decode_response(open_stored(final.response))
                try:
                    text: str | None = body.decode("utf-8")
                except UnicodeDecodeError:
                    text = None
                result = {
                    "status": int(status.split(" ", 1)[0]),
                    "run_status": final.status,
                    "headers": headers,
                    "body": text,
                }
                result_id = store.next_chunk_seq(run_id)
                if after < result_id:  # else this client has it already
                    yield sse("result", json.dumps(result), result_id)
                return
            if not listener.wait(poll):
                idle += poll
                if idle >= KEEPALIVE:
                    idle = 0.0
                    yield ": keep-alive\n\n"
        finally:
            streams.unsubscribe(run_id, listener)
