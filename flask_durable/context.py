"""The current run and step, held in :mod:`contextvars`.

:data:`current_run` and :data:`current_step` are proxies to small public
objects (:class:`~flask_durable.records.CurrentRun`,
:class:`~flask_durable.records.CurrentStep`), as :data:`flask.request` is to
the request. The engine's own per-execution state
(:class:`~flask_durable.execution.Execution`) stays private.
"""

from __future__ import annotations

from contextvars import ContextVar
from typing import cast

from werkzeug.local import LocalProxy

from .errors import StepNestingError
from .execution import Execution
from .records import CurrentRun, CurrentStep

_cv_run: ContextVar[Execution] = ContextVar("flask_durable.run")
_cv_step: ContextVar[CurrentStep] = ContextVar("flask_durable.step")


current_run: CurrentRun = cast(
    "CurrentRun",
    LocalProxy(
        _cv_run,
        "public",
        unbound_message="current_run is only set inside a durable view.",
    ),
)
current_step: CurrentStep = cast(
    "CurrentStep",
    LocalProxy(
        _cv_step, unbound_message="current_step is only set inside a step function."
    ),
)


def get_execution(what: str) -> Execution:
    """The current run's execution, or a clear :class:`RuntimeError`."""
    try:
        ex = _cv_run.get()
    except LookupError:
        raise RuntimeError(
            f"{what} can only be called inside a view decorated with"
            " @durable.endpoint (or in a step.parallel branch of one)."
        ) from None
    if _cv_step.get(None) is not None:
        raise StepNestingError(
            f"{what} cannot be called inside a step function: steps do not nest."
        )
    if ex.interrupt is not None:
        ex.check_not_swallowed(what)
    return ex
