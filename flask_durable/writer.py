"""The background checkpoint writer of ``DURABLE_CHECKPOINT="async"``, and
group commit (``DURABLE_GROUP_COMMIT``) for sync checkpoints.

Views hand step checkpoints to a queue and go on at once; one thread per
process commits them in batches (bounded by ``DURABLE_CHECKPOINT_BATCH``
items and ``DURABLE_CHECKPOINT_INTERVAL`` seconds), one transaction per
batch. Before a run suspends or stores its final response, its pending
checkpoints are flushed, in order. A crash loses at most the checkpoints
still queued: those steps run again when the run is resumed.

With group commit, a sync checkpoint is queued the same way but its request
waits until the batch holding it is committed: concurrent requests share
one transaction (one WAL flush) instead of one each.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from typing import TYPE_CHECKING, Any

from .store import LeaseLost

if TYPE_CHECKING:
    from .context import RunContext
    from .store import Store

log = logging.getLogger("flask_durable")


class _Barrier:
    __slots__ = ("done", "error", "lost")

    def __init__(self) -> None:
        self.done = threading.Event()
        self.error: BaseException | None = None
        self.lost = False


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

    def write_now(self, item: dict[str, Any]) -> bool:
        """Write one item in the calling thread (sync mode).

        :returns: ``False`` when the run's lease was lost.
        """
        return item["run_id"] not in self._commit([item])

    def commit(self, ctx: RunContext, item: dict[str, Any]) -> bool:
        """Queue one item and wait until it is committed (group commit).

        :returns: ``False`` when the run's lease was lost.
        :raises Exception: the database error that made the batch fail.
        """
        barrier = _Barrier()
        item["barrier"] = barrier
        self.submit(ctx, item)
        barrier.done.wait()
        if barrier.error is not None:
            raise barrier.error
        return not barrier.lost

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
            # A waiting request is not kept waiting for company: take what
            # queued up meanwhile and commit.
            waiting = isinstance(first, _Barrier) or (
                isinstance(first, tuple) and "barrier" in first[1]
            )
            deadline = time.monotonic() + (0.0 if waiting else self.interval)
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
        waiting = [item["barrier"] for _, item in work if "barrier" in item]
        # Requests are waiting: report a failure at once (they answer 503)
        # instead of retrying for seconds.
        attempts = 1 if waiting else 5
        for attempt in range(attempts):
            try:
                lost = self._commit([item for _, item in work])
            except Exception as e:  # database unavailable: retry, then report
                if attempt == attempts - 1:
                    log.error("checkpoints could not be written: %s", e)
                    for barrier in waiting:
                        barrier.error = e
                        barrier.done.set()
                    return e
                time.sleep(0.2 * 2**attempt)
                continue
            for ctx, item in work:
                barrier = item.get("barrier")
                if barrier is not None:
                    barrier.lost = item["run_id"] in lost
                    barrier.done.set()
                elif item["run_id"] in lost:
                    ctx.request_cancel("lost")
                elif item.get("after") is not None:
                    try:
                        item["after"]()
                    except Exception:
                        log.exception("after-commit callback failed")
            return None
        return None  # pragma: no cover

    def _commit(self, items: list[dict[str, Any]]) -> set[str]:
        """Write a batch; a lone item takes the store's one-statement path."""
        if len(items) == 1:
            item = items[0]
            try:
                if item["kind"] == "checkpoint":
                    self.store.write_steps(
                        item["run_id"],
                        item["owner"],
                        item["inserts"],
                        item["updates"],
                        new_run=item["new_run"],
                    )
                else:
                    self.store.finish(
                        item["run_id"],
                        item["owner"],
                        item["status"],
                        item["response"],
                        item["error"],
                        new_run=item["new_run"],
                        inserts=item["inserts"],
                        updates=item["updates"],
                        waits_possible=item.get("waits_possible", True),
                        notify=item.get("notify", True),
                    )
            except LeaseLost:
                return {item["run_id"]}
            return set()
        return self.store.write_batch(items)
