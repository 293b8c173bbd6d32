"""The current run and step, held in :mod:`contextvars`.

:data:`current_run` and :data:`current_step` are proxies to small public
objects (:class:`CurrentRun`, :class:`CurrentStep`), as :data:`flask.request`
is to the request. The engine's own per-execution state
(:class:`~flask_durable.execution.Execution`) stays private.
"""

from __future__ import annotations

from contextvars import ContextVar
from dataclasses import dataclass
from typing import TYPE_CHECKING, cast

from werkzeug.local import LocalProxy

from .errors import StepNestingError

if TYPE_CHECKING:
    from .execution import Execution

_cv_run: ContextVar[Execution] = ContextVar("flask_durable.run")
_cv_step: ContextVar[CurrentStep] = ContextVar("flask_durable.step")
#: Set inside the branches of ``step.parallel``, whose control-flow signals
#: are caught by ``step.parallel`` itself.
_cv_branch: ContextVar[bool] = ContextVar("flask_durable.branch", default=False)


@dataclass(frozen=True, slots=True)
class CurrentRun:
    """What :data:`current_run` exposes inside a durable view.

    :ivar id: the run id (also in the ``Durable-Run-Id`` header).
    :ivar attempt: how many times the run was resumed before this execution
        (0 for the original request).
    :ivar is_replay: ``True`` when this execution is a replay.
    :ivar endpoint: the endpoint's stable id.
    """

    id: str
    attempt: int
    is_replay: bool
    endpoint: str


@dataclass(frozen=True, slots=True)
class CurrentStep:
    """What :data:`current_step` exposes inside a step function.

    :ivar id: the step's id in this run (``"fetch"``, ``"fetch:1"``, ...).
    :ivar attempt: 0 on the first attempt, 1 on the first retry, ...
    :ivar run_id: the run's id.
    """

    id: str
    attempt: int
    run_id: str

    @property
    def idempotency_key(self) -> str:
        """Stable for this run and step across retries and crashes: pass it
        to payment and other idempotent APIs."""
        return f"{self.run_id}:{self.id}"


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
    ex.check_not_swallowed(what)
    return ex
