"""The background checkpoint writer of ``DURABLE_CHECKPOINT="async"``.

Views hand step checkpoints to a queue and go on at once; one thread per
process commits them in batches (bounded by ``DURABLE_CHECKPOINT_BATCH``
items and ``DURABLE_CHECKPOINT_INTERVAL`` seconds), one transaction per
batch. Before a run suspends or stores its final response, its pending
checkpoints are flushed, in order. A crash loses at most the checkpoints
still queued: those steps run again when the run is resumed.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .context import RunContext
    from .store import Store

log = logging.getLogger("flask_durable")


class _Barrier:
    __slots__ = ("done", "error")

    def __init__(self) -> None:
        self.done = threading.Event()
        self.error: BaseException | None = None


_STOP = object()


class CheckpointWriter:
    """Commits queued checkpoints in batches on one thread."""

    def __init__(self, store: Store, batch: int, interval: float) -> None:
        self.store = store
        self.batch = batch
        self.interval = interval
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def submit(self, ctx: RunContext, item: dict[str, Any]) -> None:
        """Queue one run's checkpoint (``run_id``, ``owner``, ``inserts``,
        ``updates``, ``new_run``)."""
        if self._thread is None:
            self._start()
        self._queue.put((ctx, item))

    def flush(self) -> None:
        """Block until everything queued so far is committed.

        :raises Exception: the database error that made a batch fail.
        """
        if self._thread is None:
            return
        barrier = _Barrier()
        self._queue.put(barrier)
        barrier.done.wait()
        if barrier.error is not None:
            raise barrier.error

    def stop(self) -> None:
        thread = self._thread
        if thread is not None:
            self._queue.put(_STOP)
            thread.join(10)
            self._thread = None

    def _start(self) -> None:
        with self._lock:
            if self._thread is None:
                thread = threading.Thread(
                    target=self._loop, name="durable-checkpoint", daemon=True
                )
                thread.start()
                self._thread = thread

    def _loop(self) -> None:
        while True:
            first = self._queue.get()
            items = [first]
            deadline = time.monotonic() + self.interval
            while len(items) < self.batch and items[-1] is not _STOP:
                remaining = deadline - time.monotonic()
                try:
                    if remaining > 0:
                        items.append(self._queue.get(timeout=remaining))
                    else:
                        items.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            stop = items[-1] is _STOP
            work = [i for i in items if isinstance(i, tuple)]
            barriers = [i for i in items if isinstance(i, _Barrier)]
            error: BaseException | None = None
            if work:
                error = self._write(work)
            for barrier in barriers:
                barrier.error = error
                barrier.done.set()
            if stop:
                return

    def _write(
        self, work: list[tuple[RunContext, dict[str, Any]]]
    ) -> BaseException | None:
        for attempt in range(5):
            try:
                lost = self.store.write_batch([item for _, item in work])
            except Exception as e:  # database unavailable: retry, then report
                if attempt == 4:
                    log.error("async checkpoints could not be written: %s", e)
                    return e
                time.sleep(0.2 * 2**attempt)
                continue
            for ctx, item in work:
                if item["run_id"] in lost:
                    ctx.request_cancel("lost")
                elif item.get("after") is not None:
                    try:
                        item["after"]()
                    except Exception:
                        log.exception("after-commit callback failed")
            return None
        return None  # pragma: no cover
