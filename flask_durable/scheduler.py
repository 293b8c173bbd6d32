"""In-process timers, the sweeper and lease heartbeats.

The database is the queue. APScheduler (3.11, memory job store only) keeps:

* one *sweeper* job that claims due runs (retries, wake-ups, runs of
  crashed processes) from the database with a lease and sets exact timers
  for runs due before the next sweep;
* *wake timers*: date jobs for runs due soon, the fast path;
* one *heartbeat* job that renews the leases of runs executing here and
  picks up cancellations requested from other processes;
* a *housekeeping* job every few minutes: forgets old events and deletes
  terminal runs older than ``DURABLE_RETENTION``, in small batches.

Claimed runs are replayed on a bounded thread pool; the sweeper claims no
more runs than the pool has free threads. Nothing here builds requests or
speaks SQL: that is :mod:`flask_durable.replay` and :mod:`flask_durable.store`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from typing import Any

from apscheduler.executors.pool import ThreadPoolExecutor as APSThreadPool
from apscheduler.jobstores.base import JobLookupError
from apscheduler.schedulers.background import BackgroundScheduler

from . import clock
from .config import Config
from .execution import Execution
from .records import Claim
from .store import Store

log = logging.getLogger("flask_durable")

#: Events are kept this long (they deduplicate for 24 hours).
_EVENT_RETENTION = 2 * 86400.0
#: How often housekeeping runs (seconds).
_HOUSEKEEPING_INTERVAL = 300.0
#: Runs deleted per transaction, the pause between two batches (seconds),
#: and the most batches of one housekeeping pass (the rest waits for the
#: next pass): pruning never holds the database for long.
_PRUNE_BATCH = 500
_PRUNE_PAUSE = 0.05
_PRUNE_MAX_BATCHES = 20


class Scheduler:
    """The background machinery of one app in one process.

    :param config: the app's configuration.
    :param store: the app's store.
    :param active: the executions running in this process, by run id.
    :param resume: executes a claimed run.
    :param new_owner: a new lease owner name for a claim.
    :param endpoints: the endpoint ids this process can execute; only their
        runs are claimed.
    """

    def __init__(
        self,
        config: Config,
        store: Store,
        active: Mapping[str, Execution],
        resume: Callable[[Claim], None],
        new_owner: Callable[[], str],
        endpoints: Callable[[], Sequence[str]],
    ) -> None:
        self.config = config
        self.store = store
        self.active = active
        self.resume = resume
        self.new_owner = new_owner
        self.endpoints = endpoints
        self._aps: BackgroundScheduler | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()
        self._inflight = 0
        self._timers: set[str] = set()
        self._backlog = False
        self.full = False
        #: Claims due runs under flow-control limits (up to the number
        #: given), as far as their limits allow; set by the lifecycle.
        self.admit: Callable[[int], list[Claim]] | None = None
        self._admitting = False
        self._admit_again = False
        #: More work for each housekeeping pass.
        self.chores: list[Callable[[], object]] = []
        #: Cron jobs, by job id: (APScheduler trigger, callable).
        self._crons: dict[str, tuple[Any, Callable[[], None]]] = {}

    @property
    def running(self) -> bool:
        """Whether the full scheduler (not only the heartbeat) runs."""
        return self._aps is not None and self.full

    def start(self, *, full: bool = True) -> None:
        """Start the timers.

        :param full: ``False`` in a process that runs no scheduler
            (``DURABLE_SCHEDULER = False``): only the heartbeat runs, which
            keeps the leases of the runs its requests execute.
        """
        config = self.config
        aps = BackgroundScheduler(
            executors={"default": APSThreadPool(4)},
            job_defaults={
                "coalesce": True,
                "max_instances": 1,
                "misfire_grace_time": None,
            },
            timezone=timezone.utc,
        )
        now = datetime.now(timezone.utc)
        aps.add_job(
            self.heartbeat,
            "interval",
            seconds=max(config.lease_seconds / 3.0, 0.05),
            id="durable-heartbeat",
        )
        if full:
            self._pool = ThreadPoolExecutor(
                config.workers, thread_name_prefix="durable-resume"
            )
            aps.add_job(
                self.sweep,
                "interval",
                seconds=config.poll_interval,
                id="durable-sweep",
                next_run_time=now,
            )
            aps.add_job(
                self.housekeeping,
                "interval",
                seconds=_HOUSEKEEPING_INTERVAL,
                id="durable-housekeeping",
                next_run_time=now,
            )
            for job_id, (trigger, fire) in self._crons.items():
                # Fired once at start too: it starts the ticks it missed.
                aps.add_job(fire, trigger, id=job_id, next_run_time=now)
        aps.start()
        self._aps = aps
        self.full = full

    def add_cron(self, job_id: str, trigger: Any, fire: Callable[[], None]) -> None:
        """Call ``fire`` at each time of ``trigger`` (an APScheduler
        trigger) while the full scheduler runs, and once when it starts."""
        self._crons[job_id] = (trigger, fire)
        aps = self._aps
        if aps is not None and self.full:
            aps.add_job(fire, trigger, id=job_id, replace_existing=True)

    def fire_crons(self) -> None:
        """Start the cron runs due by now (what the cron jobs do)."""
        for _, fire in list(self._crons.values()):
            fire()

    def next_cron(self, after: float) -> float | None:
        """The next cron time after ``after`` (seconds since the epoch)."""
        at = datetime.fromtimestamp(after + 0.001, timezone.utc)
        times = [
            t.timestamp()
            for t in (
                trigger.get_next_fire_time(None, at)
                for trigger, _ in list(self._crons.values())
            )
            if t is not None
        ]
        return min(times) if times else None

    def shutdown(self) -> None:
        aps, pool = self._aps, self._pool
        self._aps = self._pool = None
        if aps is not None:
            aps.shutdown(wait=True)
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)

    # -- timers -------------------------------------------------------------

    def wake_at(self, run_id: str, due_at: float) -> None:
        """Resume ``run_id`` at ``due_at`` if that is before the next sweep
        (later runs are found by the sweeper, so nothing is held in memory
        for them)."""
        aps = self._aps
        if aps is None:
            return
        if due_at - clock.now() > self.config.poll_interval * 1.5:
            return
        job_id = f"wake:{run_id}"
        with self._lock:
            if job_id in self._timers:
                return
            self._timers.add(job_id)
        try:
            aps.add_job(
                self._fire,
                "date",
                run_date=datetime.fromtimestamp(due_at, timezone.utc),
                args=(run_id, job_id),
                id=job_id,
                replace_existing=True,
                misfire_grace_time=None,
            )
        except Exception:  # scheduler shutting down
            with self._lock:
                self._timers.discard(job_id)

    def wake_now(self, run_id: str) -> None:
        """Resume ``run_id`` as soon as a thread is free (an event came)."""
        pool = self._pool
        if pool is not None:
            self._submit(run_id)

    def notify_finished(self, run_id: str) -> None:
        if not self._timers:
            return
        aps = self._aps
        job_id = f"wake:{run_id}"
        with self._lock:
            if job_id not in self._timers:
                return
            self._timers.discard(job_id)
        if aps is not None:
            try:
                aps.remove_job(job_id)
            except JobLookupError:
                pass

    def _fire(self, run_id: str, job_id: str) -> None:
        with self._lock:
            self._timers.discard(job_id)
        self._submit(run_id)

    def _submit(self, run_id: str) -> None:
        pool = self._pool
        if pool is None:
            return
        with self._lock:
            self._inflight += 1
        try:
            pool.submit(self._claim_and_resume, run_id)
        except RuntimeError:  # pool shut down
            with self._lock:
                self._inflight -= 1

    def _claim_and_resume(self, run_id: str) -> None:
        try:
            claim = self.store.claim(run_id, self.new_owner(), self.endpoints())
            if claim is not None:
                self.resume(claim)
            self._drain()
        except Exception:
            log.exception("resuming run %s failed", run_id)
        finally:
            with self._lock:
                self._inflight -= 1

    def admit_soon(self) -> None:
        """Admit queued runs now, in a pool thread (a slot may have freed,
        or a run was queued)."""
        pool = self._pool
        if pool is None or self.admit is None:
            return
        # One pass at a time per process: a request during a pass makes it
        # run once more, instead of many passes queueing on the key's lock.
        with self._lock:
            if self._admitting:
                self._admit_again = True
                return
            self._admitting = True
            self._admit_again = False
        try:
            pool.submit(self._admit_passes)
        except RuntimeError:  # pool shut down
            with self._lock:
                self._admitting = False

    def _admit_passes(self) -> None:
        try:
            while True:
                self._admit_and_resume()
                with self._lock:
                    if not self._admit_again or self._pool is None:
                        self._admitting = False
                        return
                    self._admit_again = False
        except BaseException:
            with self._lock:
                self._admitting = False
            raise

    def _admit_and_resume(self) -> None:
        pool, admit = self._pool, self.admit
        if pool is None or admit is None:
            return
        with self._lock:
            free = self.config.workers - self._inflight
        try:
            claims = admit(max(free, 1))
        except Exception:
            log.exception("durable admission failed; the next sweep retries")
            return
        for claim in claims:
            with self._lock:
                self._inflight += 1
            try:
                pool.submit(self._resume_claimed, claim)
            except RuntimeError:
                with self._lock:
                    self._inflight -= 1
                self.store.release(claim.id, claim.owner)

    def _resume_claimed(self, claim: Claim) -> None:
        try:
            self.resume(claim)
            self._drain()
        except Exception:
            log.exception("resuming run %s failed", claim.id)
        finally:
            # Counted as busy until the drain ends too, so the sweeper never
            # claims runs that would wait (lease ticking) for a thread.
            with self._lock:
                self._inflight -= 1

    def _drain(self) -> None:
        """While the last sweep left due runs behind, keep this thread busy
        claiming and resuming them one by one (a backlog of thousands of
        due runs drains at full speed, not a batch per sweep). A claim is
        made only when this thread is about to execute the run."""
        while self._backlog and self._pool is not None:
            try:
                claims = self.store.claim_due(self.new_owner(), 1, self.endpoints())
            except Exception:
                log.exception("durable claim failed; the next sweep retries")
                return
            if not claims:
                self._backlog = False
                return
            try:
                self.resume(claims[0])
            except Exception:
                log.exception("resuming run %s failed", claims[0].id)

    # -- periodic jobs --------------------------------------------------------

    def sweep(self) -> None:
        """Claim due runs (up to the free threads) and time the ones due
        before the next sweep."""
        pool = self._pool
        if pool is None:
            return
        config = self.config
        try:
            endpoints = self.endpoints()
            with self._lock:
                free = config.workers - self._inflight
            if free <= 0:
                self._backlog = True  # busy threads drain when they finish
            else:
                owner = self.new_owner()
                claims = self.store.claim_due(owner, free, endpoints)
                self._backlog = len(claims) == free
                if self.admit is not None and len(claims) < free:
                    claims += self.admit(free - len(claims))
                for claim in claims:
                    with self._lock:
                        self._inflight += 1
                    try:
                        pool.submit(self._resume_claimed, claim)
                    except RuntimeError:
                        with self._lock:
                            self._inflight -= 1
                        self.store.release(claim.id, claim.owner)
            horizon = config.poll_interval * 1.5
            for run_id, due_at in self.store.upcoming(horizon, 1000, endpoints):
                self.wake_at(run_id, due_at)
        except Exception:
            log.exception("durable sweep failed; retrying at the next interval")

    def heartbeat(self) -> None:
        """Renew the leases of runs executing in this process."""
        # Runs whose final response is queued are renewed too (an async
        # batch can take a while); a "lost" answer for them only means the
        # response was committed meanwhile.
        contexts = [c for c in list(self.active.values()) if c.in_db]
        if not contexts:
            return
        started = time.monotonic()
        try:
            lost, cancelled = self.store.renew([(c.id, c.owner) for c in contexts])
        except Exception:
            log.exception("durable heartbeat failed; retrying")
            return
        for ctx in contexts:
            if ctx.id in lost:
                if ctx.finishing or self.active.get(ctx.id) is not ctx:
                    continue  # its final response was written meanwhile
                log.warning("run %s: lease lost; stopping at its next step", ctx.id)
                ctx.request_cancel("lost")
            else:
                ctx.lease_renewed(started)
                if ctx.id in cancelled:
                    ctx.request_cancel()

    def housekeeping(self) -> None:
        """Forget old events; delete terminal runs older than the
        retention (``DURABLE_RETENTION``), a bounded number per pass."""
        try:
            self.store.purge_events(clock.now() - _EVENT_RETENTION)
        except Exception:
            log.exception("durable housekeeping failed")
        for chore in self.chores:
            try:
                chore()
            except Exception:
                log.exception("durable housekeeping failed")
        self.prune()

    def prune(
        self,
        batch: int = _PRUNE_BATCH,
        max_batches: int = _PRUNE_MAX_BATCHES,
        pause: float = _PRUNE_PAUSE,
    ) -> int:
        """Delete terminal runs finished longer than the retention ago, in
        batches of ``batch`` runs (one transaction each, ``pause`` seconds
        apart), at most ``max_batches`` batches; returns how many runs were
        deleted. Nothing is deleted when the retention is ``None``."""
        retention = self.config.retention
        if retention is None:
            return 0
        deleted = 0
        try:
            for i in range(max_batches):
                if i:
                    time.sleep(pause)
                n = self.store.prune(clock.now() - retention, batch)
                deleted += n
                if n < batch:
                    break
        except Exception:
            log.exception("durable retention pass failed; retrying later")
        return deleted
