"""Signals sent as runs and steps change state (blinker).

Each is sent with the Flask app as sender and keyword arguments::

    from flask_durable import signals

    @signals.run_failed.connect_via(app)
    def alert(app, run_id, endpoint, **extra):
        ...

Receivers run in the thread that made the change; keep them quick and
never raise from them.
"""

from __future__ import annotations

from blinker import Namespace

_signals = Namespace()

#: A new run was recorded: ``run_id``, ``endpoint``.
run_started = _signals.signal("durable-run-started")
#: A step's result was checkpointed: ``run_id``, ``step_id``.
step_completed = _signals.signal("durable-step-completed")
#: A step attempt failed: ``run_id``, ``step_id``, ``final`` (``True`` when
#: it will not be retried).
step_failed = _signals.signal("durable-step-failed")
#: A run went asynchronous: ``run_id``, ``status`` (``scheduled``,
#: ``sleeping`` or ``waiting``), ``due_at`` (POSIX time).
run_suspended = _signals.signal("durable-run-suspended")
#: A run finished with its view's response: ``run_id``, ``endpoint``.
run_completed = _signals.signal("durable-run-completed")
#: A run finished because its view raised, or was cancelled or timed out:
#: ``run_id``, ``endpoint``, ``status`` (``failed`` or ``cancelled``).
run_failed = _signals.signal("durable-run-failed")
