"""Test durable views without waiting: :class:`DurableTester`.

See :doc:`/testing` for a walk-through.

While a tester is attached to an app:

* no scheduler, timer or listener thread starts: due work runs when the test
  asks for it (:meth:`~DurableTester.drain`, :meth:`~DurableTester.advance`,
  :meth:`~DurableTester.send`) or follows a wait URL, in the calling thread;
* the engine's clock is virtual: :meth:`~DurableTester.advance` moves it
  forward, so a one-day sleep or a retry's backoff takes no real time;
* a wait URL runs the run as far as it can go (retries and sleeps come due
  at once) and answers its final response, or ``202`` with its status when
  it waits for an event: ``follow_redirects=True`` gets the final answer.

The pytest fixture ``durable_tester`` (registered by this package's pytest
plugin) builds one for the ``app`` fixture of the test module and closes it
after the test.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any

from flask import Flask

from . import clock
from .durations import Duration, parse_duration
from .errors import _LeaseLost
from .execution import Execution
from .lifecycle import Lifecycle
from .records import RunInfo, RunStatus, RunSummary

__all__ = ["DurableTester", "InjectedFailure", "SimulatedCrash"]

#: Past a due time by this much when the clock moves to it.
_STEP = 0.001
#: Executions one :meth:`DurableTester.drain` runs at most.
_MAX_EXECUTIONS = 10_000


class InjectedFailure(Exception):
    """The default error of :meth:`DurableTester.fail_step`."""


class SimulatedCrash(_LeaseLost):
    """Raised after a step chosen by :meth:`DurableTester.crash_after`: the
    execution stops there, as if its process died."""


class _Clock:
    """Wall time plus the seconds a tester moved it forward."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset


class DurableTester:
    """Drives the durable endpoints and functions of ``app`` in a test.

    :param app: a Flask app with :class:`~flask_durable.Durable` set up. Give
        it its own database (a temporary SQLite file): the tester runs all
        due work of the app.
    """

    def __init__(self, app: Flask) -> None:
        lifecycle = app.extensions.get("durable")
        if not isinstance(lifecycle, Lifecycle):
            raise RuntimeError(
                "flask-durable is not set up on this app: call durable.init_app(app)"
            )
        if lifecycle.hooks is not None:
            raise RuntimeError("this app already has a DurableTester")
        self.app = app
        self._lifecycle = lifecycle
        self._lock = threading.Lock()
        self._failures: dict[str, list[BaseException | None]] = {}
        self._mocks: dict[str, Any] = {}
        self._crashes: set[str] = set()
        self._previous_now = clock.now
        self._clock = _Clock()
        self._draining = False
        self.closed = False
        lifecycle.detach_threads()
        clock.now = self._clock
        lifecycle.hooks = self
        lifecycle.settle = self._settle

    # -- setting up what happens ----------------------------------------------

    def fail_step(
        self,
        step_id: str,
        times: int = 1,
        error: BaseException | None = None,
    ) -> None:
        """Make the next ``times`` attempts of ``step_id`` raise ``error``
        (an :class:`InjectedFailure` by default) instead of calling the
        step's function. Retries follow the step's usual policy, and a
        :class:`~flask_durable.NonRetriableError` fails the step at once.

        :param step_id: the step's id as the run stores it (a second step
            of the same name is ``"name:1"``).
        """
        if times < 1:
            raise ValueError("fail_step: times must be at least 1")
        with self._lock:
            self._failures.setdefault(step_id, []).extend([error] * times)

    def mock_step(self, step_id: str, value: Any) -> None:
        """Make ``step_id`` return ``value`` without calling its function,
        in every run until :meth:`unmock_step`. The value is checkpointed
        as a real result would be."""
        with self._lock:
            self._mocks[step_id] = value

    def unmock_step(self, step_id: str) -> None:
        """Call ``step_id``'s own function again."""
        with self._lock:
            self._mocks.pop(step_id, None)

    def crash_after(self, step_id: str) -> None:
        """Stop the next execution that completes ``step_id`` right after
        its result is checkpointed, as if its process died there.

        The run keeps what it committed and is resumed by the next
        :meth:`drain` (or wait URL), which replays the view: the steps
        before return their stored results without running again. The
        request that was executing answers ``303`` to the run's wait URL,
        as a client that lost its connection and came back would see.
        """
        with self._lock:
            self._crashes.add(step_id)

    # -- making time pass -------------------------------------------------------

    def now(self) -> datetime:
        """The engine's current (virtual) time."""
        return datetime.fromtimestamp(self._clock(), timezone.utc)

    def send(self, name: str, data: Any = None, *, id: str | None = None) -> str:
        """Send an event (as :meth:`Durable.send <flask_durable.Durable.send>`)
        and run what it started or woke; returns the event's id."""
        with self.app.app_context():
            event_id = self._lifecycle.send(name, data, id)
        self.drain()
        return event_id

    def advance(self, duration: Duration) -> int:
        """Move the clock forward by ``duration`` (``"1d"``, seconds, a
        :class:`~datetime.timedelta`), running everything that comes due
        on the way, in order: sleeps end, retries run, waits time out,
        cron ticks fire. Returns the number of executions run."""
        seconds = parse_duration(duration)
        target = self._clock() + seconds
        executed = self.drain()
        while True:
            now = self._clock()
            upcoming = self._next_due(now, target)
            if upcoming is None:
                self._clock.offset += max(0.0, target - now)
                return executed + self.drain()
            self._clock.offset += max(0.0, upcoming + _STEP - now)
            executed += self.drain()

    def drain(self) -> int:
        """Run all work due now, in the calling thread, until none is left;
        returns the number of executions run.

        :raises RuntimeError: after 10,000 executions (a run that never
            stops coming due).
        """
        lifecycle = self._lifecycle
        if self._draining:
            return 0  # a wait URL asked from inside a view
        self._draining = True
        executed = 0
        try:
            with self.app.app_context():
                self._fire_crons()
                lifecycle.writer.flush()
                while True:
                    claims = lifecycle.store.claim_due(
                        lifecycle.new_owner(), 1, lifecycle.endpoints()
                    )
                    if not claims:
                        claims = lifecycle.admit_due(1)
                    if not claims:
                        lifecycle.repair_invokes()
                        claims = lifecycle.store.claim_due(
                            lifecycle.new_owner(), 1, lifecycle.endpoints()
                        )
                    if not claims:
                        return executed
                    executed += 1
                    if executed > _MAX_EXECUTIONS:
                        raise RuntimeError(
                            f"DurableTester.drain: more than {_MAX_EXECUTIONS}"
                            " executions; does a run keep coming due?"
                        )
                    lifecycle.resume(claims[0])
                    lifecycle.writer.flush()
        finally:
            self._draining = False

    # -- looking at runs ----------------------------------------------------------

    def get_run(self, run_id: str) -> RunInfo | None:
        """The run, as :meth:`Durable.get_run <flask_durable.Durable.get_run>`."""
        with self.app.app_context():
            return self._lifecycle.get_run(run_id)

    def runs(self, endpoint: str | None = None) -> list[RunSummary]:
        """The app's runs, newest first (at most 1,000)."""
        with self.app.app_context():
            found, _ = self._lifecycle.list_runs(endpoint=endpoint, limit=1000)
        return found

    # -- the end ---------------------------------------------------------------------

    def close(self) -> None:
        """Detach from the app and give the clock back its real time."""
        if self.closed:
            return
        self.closed = True
        lifecycle = self._lifecycle
        lifecycle.writer.stop()
        lifecycle.hooks = None
        lifecycle.settle = None
        if clock.now is self._clock:
            clock.now = self._previous_now

    def __enter__(self) -> DurableTester:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- the engine's side (StepHooks) --------------------------------------------

    def step_function(
        self, ex: Execution, step_id: str, fn: Callable[..., Any]
    ) -> Callable[..., Any]:
        with self._lock:
            failures = self._failures.get(step_id)
            if failures:
                error = failures.pop(0) or InjectedFailure(
                    f"failure injected into step {step_id!r}"
                )

                def fail(*args: Any, **kwargs: Any) -> Any:
                    raise error

                return fail
            if step_id in self._mocks:
                value = self._mocks[step_id]
                return lambda *args, **kwargs: value
        return fn

    def step_committed(self, ex: Execution, step_id: str) -> None:
        with self._lock:
            if step_id not in self._crashes:
                return
            self._crashes.discard(step_id)
        ex.committer.flush()
        # The process "dies": its lease is given back at once, as if it had
        # expired, so that the next drain replays the run.
        self._lifecycle.store.release(ex.id, ex.owner)
        raise SimulatedCrash(step_id)

    # -- internals ---------------------------------------------------------------------

    def _settle(self, run_id: str) -> None:
        """A wait URL was asked for: move the run as far as it can go."""
        for _ in range(_MAX_EXECUTIONS):
            self.drain()
            row = self._lifecycle.store.get_run(run_id)
            if row is None or row.status not in (
                RunStatus.SCHEDULED,
                RunStatus.SLEEPING,
                RunStatus.QUEUED,
            ):
                return  # finished, waiting for an event, or unknown
            if row.due_at is None:
                return
            now = self._clock()
            self._clock.offset += max(0.0, row.due_at + _STEP - now)
        raise RuntimeError(f"DurableTester: run {run_id} never settles")

    def _next_due(self, now: float, target: float) -> float | None:
        """The earliest due time after ``now`` and up to ``target``: a run
        or a cron tick."""
        lifecycle = self._lifecycle
        with self.app.app_context():
            found = lifecycle.store.upcoming(target - now, 1, lifecycle.endpoints())
        times = [due for _, due in found]
        tick = lifecycle.scheduler.next_cron(now)
        if tick is not None and tick <= target:
            times.append(tick)
        return min(times) if times else None

    def _fire_crons(self) -> None:
        self._lifecycle.scheduler.fire_crons()
