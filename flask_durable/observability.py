"""What operators see of runs: a replay-aware logger, Prometheus metrics
and OpenTelemetry spans.

- :data:`logger` (``durable.logger``) drops the records logged while a
  replay re-runs code that an earlier execution of the run already ran;
  :class:`ReplayFilter` does the same for any logger or handler.
- :func:`instrument` sets up :mod:`flask_durable.metrics`
  (``DURABLE_METRICS``) and :mod:`flask_durable.tracing` (``DURABLE_OTEL``)
  for an app, behind one :class:`Observer` that the engine tells of every
  step attempt. With both off there is no observer: the engine then only
  checks that it is ``None``.

``docs/observability.rst`` documents what each produces.
"""

from __future__ import annotations

import importlib
import logging
import time
from collections.abc import Callable
from contextvars import ContextVar, Token
from typing import TYPE_CHECKING, Any

from .config import Config
from .context import _cv_run
from .execution import Execution, ViewCaller
from .records import STEP_COMPLETED, Backlog, StepRecord

if TYPE_CHECKING:
    from flask import Flask

    from .metrics import Metrics
    from .tracing import Tracing

# -- the replay-aware logger -----------------------------------------------------


class ReplayFilter(logging.Filter):
    """Drops the records logged while a replay re-runs code that an earlier
    execution of the run already ran.

    A replay runs the view from the top: until it reaches a step that does
    new work (a step not stored yet, a retry, a sleep that is over) or
    passes the last step the earlier execution stored, every line it runs
    was run before, and logged before. Records logged outside a durable view
    (or in a run's first execution) pass.

    ``durable.logger`` has one; add one to your own loggers (or handlers)
    to get the same behaviour::

        app.logger.addFilter(ReplayFilter())
    """

    def filter(self, record: logging.LogRecord) -> bool:
        ex = _cv_run.get(None)
        return ex is None or not ex.replaying


#: ``durable.logger``: the ``flask_durable.app`` logger, with a
#: :class:`ReplayFilter`. Configure it as any logger (its records propagate
#: to the root logger).
logger = logging.getLogger("flask_durable.app")
if not any(isinstance(f, ReplayFilter) for f in logger.filters):
    logger.addFilter(ReplayFilter())

# -- metrics and tracing ---------------------------------------------------------

_EXTRAS = (
    ("metrics", "DURABLE_METRICS", "prometheus_client", "prometheus"),
    ("otel", "DURABLE_OTEL", "opentelemetry.trace", "otel"),
)


def require_extras(config: Config) -> None:
    """Check that what ``DURABLE_METRICS`` and ``DURABLE_OTEL`` need is
    installed.

    :raises ImportError: naming the extra to install.
    """
    for attribute, key, module, extra in _EXTRAS:
        if not getattr(config, attribute):
            continue
        try:
            importlib.import_module(module)
        except ImportError as e:
            raise ImportError(
                f"{key} = True needs {module.split('.')[0]}, which is not"
                f" installed: pip install 'flask-durable[{extra}]'"
            ) from e


def instrument(
    app: Flask, config: Config, read_backlog: Callable[[], Backlog]
) -> Observer | None:
    """Set up metrics (and the ``<prefix>/metrics`` route) and tracing for
    an app, as its configuration asks (:func:`require_extras` first).

    :param read_backlog: reads the app's unfinished runs (metrics gauges).
    :returns: the observer to give the app's executions, or ``None`` when
        both are off.
    """
    if not (config.metrics or config.otel):
        return None
    metrics = tracing = None
    if config.metrics:
        from .metrics import Metrics

        metrics = Metrics(app, read_backlog)
        app.add_url_rule(
            f"{config.url_prefix}/metrics", "durable_metrics", metrics.view
        )
    if config.otel:
        from .tracing import Tracing

        tracing = Tracing()
    return Observer(metrics, tracing)


class _Attempt:
    """A step attempt under way: when it began, and its span."""

    __slots__ = ("ex", "step_id", "started", "span", "token")

    def __init__(
        self, ex: Execution, step_id: str, span: Any, token: Token[Any] | None
    ) -> None:
        self.ex = ex
        self.step_id = step_id
        self.started = time.perf_counter()
        self.span = span
        self.token = token


#: The step attempt under way in this context (steps do not nest; each
#: ``step.parallel`` branch runs in a context of its own).
_cv_attempt: ContextVar[_Attempt | None] = ContextVar(
    "flask_durable.attempt", default=None
)


class Observer:
    """The :class:`~flask_durable.execution.StepObserver` of an app: times
    each step attempt for the metrics and traces it.

    Outcomes of an attempt: ``completed``; ``error`` (failed, retried
    later); ``failed`` (for good: retries exhausted, non-retriable, over a
    limit); ``unfinished`` in traces only, for an attempt the view left
    (its value could not be stored).
    """

    def __init__(self, metrics: Metrics | None, tracing: Tracing | None) -> None:
        self.metrics = metrics
        self.tracing = tracing
        #: Calls a durable view in a run span; ``None`` without tracing.
        self.call_view: ViewCaller | None = None if tracing is None else self._call_view

    def attempt_started(self, ex: Execution, rec: StepRecord) -> None:
        span = token = None
        if self.tracing is not None:
            span, token = self.tracing.start_step(ex, rec)
        _cv_attempt.set(_Attempt(ex, rec.step_id, span, token))

    def attempt_ended(
        self,
        ex: Execution,
        rec: StepRecord,
        error: BaseException | None,
        will_retry: bool,
    ) -> None:
        attempt = _cv_attempt.get()
        if attempt is None or attempt.ex is not ex or attempt.step_id != rec.step_id:
            return  # no attempt of this step began here (a wait that timed out)
        _cv_attempt.set(None)
        if error is None:
            outcome = "completed" if rec.status == STEP_COMPLETED else "failed"
        else:
            outcome = "error" if will_retry else "failed"
        if self.metrics is not None:
            seconds = time.perf_counter() - attempt.started
            self.metrics.step_attempt(ex.endpoint, outcome, seconds)
        self._end_span(attempt, outcome, error)

    def end_open_step(self, ex: Execution, error: BaseException | None) -> None:
        """End the span of a step attempt of ``ex`` still open in this
        context, as ``unfinished``."""
        attempt = _cv_attempt.get()
        if attempt is not None and attempt.ex is ex:
            _cv_attempt.set(None)
            self._end_span(attempt, "unfinished", error)

    def _end_span(
        self, attempt: _Attempt, outcome: str, error: BaseException | None
    ) -> None:
        if self.tracing is not None and attempt.token is not None:
            self.tracing.end_step(attempt.span, attempt.token, outcome, error)

    def _call_view(
        self, ex: Execution, view: Callable[..., Any], args: Any, kwargs: Any
    ) -> Any:
        assert self.tracing is not None
        return self.tracing.call_view(ex, view, args, kwargs, self.end_open_step)
