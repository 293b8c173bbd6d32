"""OpenTelemetry spans for runs and steps (``DURABLE_OTEL``, extra
``[otel]``).

Each execution of a durable view is a ``durable.run <endpoint>`` span, and
each step attempt inside it a ``durable.step <step id>`` child span, current
while the step's function runs (so the spans of an instrumented HTTP client
called by the step are its children). The run span continues the trace of
the current span when there is one (an instrumented server), else the W3C
``traceparent`` of the request; a replay carries the original request's
headers, so every execution of a run joins one trace.

Imported only when ``DURABLE_OTEL`` is on: this module needs
``opentelemetry-api``.
"""

from __future__ import annotations

from collections.abc import Callable
from contextvars import Token
from typing import Any

from flask import request
from opentelemetry import context, propagate, trace
from opentelemetry.context import Context
from opentelemetry.trace import Span, Status, StatusCode

from .errors import _Cancelled, _Suspend
from .execution import Execution
from .records import StepRecord

#: The name of the tracer (the instrumentation scope).
TRACER_NAME = "flask_durable"


class Tracing:
    """Starts and ends the spans of one app's runs and steps."""

    def __init__(self) -> None:
        # A proxy until the app sets a tracer provider: resolved lazily.
        self.tracer = trace.get_tracer(TRACER_NAME)

    def call_view(
        self,
        ex: Execution,
        view: Callable[..., Any],
        args: Any,
        kwargs: Any,
        end_open_step: Callable[[Execution, BaseException | None], None],
    ) -> Any:
        """Call a durable view in a run span.

        :param end_open_step: ends the span of a step attempt the view left
            unfinished (its value could not be stored, or the view raised
            through it).
        """
        parent = None
        if not trace.get_current_span().get_span_context().is_valid:
            parent = propagate.extract(request.headers)
        attributes: dict[str, str | int | bool] = {
            "durable.run.id": ex.id,
            "durable.endpoint": ex.endpoint,
            "durable.run.attempt": ex.attempt,
            "durable.run.replay": ex.is_replay,
        }
        with self.tracer.start_as_current_span(
            f"durable.run {ex.endpoint}",
            context=parent,
            attributes=attributes,
            record_exception=False,
            set_status_on_exception=False,
        ) as span:
            error: BaseException | None = None
            try:
                rv = view(*args, **kwargs)
            except _Suspend as s:
                span.set_attribute("durable.run.outcome", s.status)
                raise
            except _Cancelled:
                span.set_attribute("durable.run.outcome", "cancelled")
                raise
            except Exception as e:
                error = e
                span.set_attribute("durable.run.outcome", "failed")
                span.record_exception(e)
                span.set_status(Status(StatusCode.ERROR, f"{type(e).__name__}: {e}"))
                raise
            except BaseException:
                # The lease was lost or the database is unreachable: another
                # execution carries the run on.
                span.set_attribute("durable.run.outcome", "interrupted")
                raise
            finally:
                end_open_step(ex, error)
            span.set_attribute("durable.run.outcome", "completed")
            return rv

    def start_step(self, ex: Execution, rec: StepRecord) -> tuple[Span, Token[Context]]:
        """Start a step attempt's span and make it current; returns the
        span and the token that :meth:`end_step` detaches."""
        span = self.tracer.start_span(
            f"durable.step {rec.step_id}",
            attributes={
                "durable.run.id": ex.id,
                "durable.endpoint": ex.endpoint,
                "durable.step.id": rec.step_id,
                "durable.step.attempt": rec.attempts,
            },
        )
        return span, context.attach(trace.set_span_in_context(span))

    @staticmethod
    def end_step(
        span: Span, token: Token[Context], outcome: str, error: BaseException | None
    ) -> None:
        """End a step attempt's span with its ``outcome`` (``completed``,
        ``error``: retried later, ``failed``: for good, ``unfinished``)."""
        context.detach(token)
        span.set_attribute("durable.step.outcome", outcome)
        if error is not None:
            span.record_exception(error)
        if outcome != "completed":
            detail = f"{type(error).__name__}: {error}" if error else outcome
            span.set_status(Status(StatusCode.ERROR, detail))
        span.end()
