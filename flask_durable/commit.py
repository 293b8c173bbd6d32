"""How a run's writes reach the database: one committer, chosen once per run.

* :class:`DirectCommitter` (``DURABLE_CHECKPOINT = "sync"``): the calling
  thread writes and commits before it goes on.
* :class:`GroupCommitter` (``"sync"`` with ``DURABLE_GROUP_COMMIT``): the
  write is queued for the writer thread, which commits what concurrent
  requests queued in one transaction; the caller still waits for its commit.
* :class:`BatchedCommitter` (``"async"``): the write is queued and the
  caller goes on at once; the writer thread commits batches bounded by
  ``DURABLE_CHECKPOINT_BATCH`` intents and ``DURABLE_CHECKPOINT_INTERVAL``
  seconds. A crash loses at most what is still queued: those steps run
  again when the run is resumed.

Every committer reports the outcome of each write the same way: it calls
``on_committed`` once the write is committed, or ``on_lost`` when nothing
was written and this execution must stop: the run's lease belongs to
another process, or (batched) the database stayed unavailable, in which
case the run is resumed elsewhere once its lease expires. Signals
and in-memory state changes that announce a write hang off these callbacks,
so they always follow the commit.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

from .records import Checkpoint, Finish
from .store import Store

log = logging.getLogger("flask_durable")

Callback = Callable[[], None] | None


class _Item:
    __slots__ = ("intent", "on_committed", "on_lost", "waiter")

    def __init__(
        self,
        intent: Checkpoint | Finish,
        on_committed: Callback,
        on_lost: Callback,
        waiter: _Waiter | None,
    ) -> None:
        self.intent = intent
        self.on_committed = on_committed
        self.on_lost = on_lost
        self.waiter = waiter


class _Waiter:
    """A caller blocked until its write (or a flush) is committed."""

    __slots__ = ("done", "error", "lost")

    def __init__(self) -> None:
        self.done = threading.Event()
        self.error: BaseException | None = None
        self.lost = False


_STOP = object()


class Committer:
    """Writes one run's intents; see the module docs."""

    def submit(
        self,
        intent: Checkpoint | Finish,
        on_committed: Callback = None,
        on_lost: Callback = None,
    ) -> None:
        """Write ``intent``.

        :raises sqlalchemy.exc.DBAPIError: (direct and group commit) the
            database is unavailable; nothing was written.
        """
        raise NotImplementedError

    def flush(self) -> None:
        """Return once everything submitted so far is committed."""


class DirectCommitter(Committer):
    """Commits in the calling thread."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def submit(
        self,
        intent: Checkpoint | Finish,
        on_committed: Callback = None,
        on_lost: Callback = None,
    ) -> None:
        if self.store.write(intent):
            if on_committed is not None:
                on_committed()
        elif on_lost is not None:
            on_lost()


class WriterThread:
    """The one thread per process that commits queued intents in batches
    (for :class:`GroupCommitter` and :class:`BatchedCommitter`)."""

    def __init__(self, store: Store, batch: int, interval: float) -> None:
        self.store = store
        self.batch = batch
        self.interval = interval
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def put(self, item: _Item) -> None:
        if self._thread is None:
            self._start()
        self._queue.put(item)

    def flush(self) -> None:
        """Block until everything queued so far is committed.

        :raises Exception: the database error that made a batch fail.
        """
        if self._thread is None:
            return
        waiter = _Waiter()
        self._queue.put(waiter)
        waiter.done.wait()
        if waiter.error is not None:
            raise waiter.error

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
            # A blocked caller is not kept waiting for company: take what
            # queued up meanwhile and commit.
            blocked = isinstance(first, _Waiter) or (
                isinstance(first, _Item) and first.waiter is not None
            )
            deadline = time.monotonic() + (0.0 if blocked else self.interval)
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
            work = [i for i in items if isinstance(i, _Item)]
            error = self._write(work) if work else None
            for waiter in items:
                if isinstance(waiter, _Waiter):
                    waiter.error = error
                    waiter.done.set()
            if stop:
                return

    def _write(self, work: list[_Item]) -> BaseException | None:
        blocked = [item.waiter for item in work if item.waiter is not None]
        # Callers are blocked: report a failure at once (they answer 503)
        # instead of retrying for seconds.
        attempts = 1 if blocked else 5
        for attempt in range(attempts):
            try:
                if len(work) == 1:
                    intent = work[0].intent
                    lost = set() if self.store.write(intent) else {intent.run_id}
                else:
                    lost = self.store.write_batch([item.intent for item in work])
            except Exception as e:  # database unavailable: retry, then report
                if attempt == attempts - 1:
                    log.error("checkpoints could not be written: %s", e)
                    for item in work:
                        if item.waiter is not None:
                            item.waiter.error = e
                            item.waiter.done.set()
                        elif item.on_lost is not None:
                            item.on_lost()
                    return e
                time.sleep(0.2 * 2**attempt)
                continue
            for item in work:
                is_lost = item.intent.run_id in lost
                if item.waiter is not None:
                    # The caller runs its own callbacks.
                    item.waiter.lost = is_lost
                    item.waiter.done.set()
                    continue
                callback = item.on_lost if is_lost else item.on_committed
                if callback is not None:
                    try:
                        callback()
                    except Exception:
                        log.exception("after-commit callback failed")
            return None
        return None  # pragma: no cover


class GroupCommitter(Committer):
    """Queues for the writer thread and waits for the commit."""

    def __init__(self, writer: WriterThread) -> None:
        self.writer = writer

    def submit(
        self,
        intent: Checkpoint | Finish,
        on_committed: Callback = None,
        on_lost: Callback = None,
    ) -> None:
        waiter = _Waiter()
        self.writer.put(_Item(intent, None, None, waiter))
        waiter.done.wait()
        if waiter.error is not None:
            raise waiter.error
        callback = on_lost if waiter.lost else on_committed
        if callback is not None:
            callback()

    def flush(self) -> None:
        self.writer.flush()


class BatchedCommitter(Committer):
    """Queues for the writer thread and returns at once."""

    def __init__(self, writer: WriterThread) -> None:
        self.writer = writer

    def submit(
        self,
        intent: Checkpoint | Finish,
        on_committed: Callback = None,
        on_lost: Callback = None,
    ) -> None:
        self.writer.put(_Item(intent, on_committed, on_lost, None))

    def flush(self) -> None:
        self.writer.flush()
