"""Signals sent as runs and steps change state (blinker).

Each is sent with the Flask app as sender and keyword arguments::

    from flask_durable import signals

    @signals.run_failed.connect_via(app)
    def alert(app, run_id, endpoint, **extra):
        ...

Each signal is sent once the state it announces is committed. Receivers
run in the thread that made the change (in ``"async"`` checkpoint mode, the
writer thread); keep them quick and never raise from them.
"""

from __future__ import annotations

from blinker import Namespace

_signals = Namespace()

#: A new run was stored: ``run_id``, ``endpoint``.
run_started = _signals.signal("durable-run-started")
#: A stored run began executing again (a replay): ``run_id``, ``endpoint``,
#: ``attempt``.
run_resumed = _signals.signal("durable-run-resumed")
#: A step's result was checkpointed: ``run_id``, ``step_id``.
step_completed = _signals.signal("durable-step-completed")
#: A step attempt failed: ``run_id``, ``step_id``, ``final`` (``True`` when
#: it will not be retried), ``attempt`` (0-based) and ``error`` (the
#: exception, or ``None`` when the step broke a limit or the attempt failed
#: in another process).
step_failed = _signals.signal("durable-step-failed")
#: A run went asynchronous: ``run_id``, ``status`` (``scheduled``,
#: ``sleeping`` or ``waiting``), ``due_at`` (POSIX time).
run_suspended = _signals.signal("durable-run-suspended")
#: A run finished with its view's response: ``run_id``, ``endpoint``.
run_completed = _signals.signal("durable-run-completed")
#: A run finished because its view raised, or was cancelled or timed out:
#: ``run_id``, ``endpoint``, ``status`` (``failed`` or ``cancelled``).
run_failed = _signals.signal("durable-run-failed")
