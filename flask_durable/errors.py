"""Exceptions raised by and to step functions."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from .durations import Duration


class NonRetriableError(Exception):
    """Raise inside a step function to fail the step for good: it is not
    retried and :class:`StepError` is raised in the view at once."""


class RetryAfterError(Exception):
    """Raise inside a step function to retry it no earlier than
    ``retry_after``.

    :param message: what went wrong.
    :param retry_after: a duration (``"30s"``, seconds, ``timedelta``) or a
        :class:`~datetime.datetime` (naive means UTC).
    """

    def __init__(self, message: str, retry_after: Duration | datetime) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class StepError(Exception):
    """Raised in the view when a step failed for good: its retries are
    exhausted, it raised :class:`NonRetriableError`, or it broke a limit.

    :ivar step_id: the id of the failed step.
    :ivar error_type: the type name of the original error.
    :ivar error_message: the message of the original error.
    """

    def __init__(self, step_id: str, error_type: str, error_message: str) -> None:
        super().__init__(f"step {step_id!r} failed: {error_type}: {error_message}")
        self.step_id = step_id
        self.error_type = error_type
        self.error_message = error_message

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.step_id, self.error_type, self.error_message))


class _Interrupt(BaseException):
    """Base of the private control-flow signals. It derives from
    :class:`BaseException` so that ``except Exception`` in a view does not
    swallow it."""


class _Suspend(_Interrupt):
    """The run must stop here and continue at ``due_at`` (or on an event)."""

    def __init__(self, due_at: float, status: str) -> None:
        super().__init__(status)
        self.due_at = due_at
        self.status = status


class _Cancelled(_Interrupt):
    """The run was cancelled or timed out; it stops at this step boundary."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class _LeaseLost(_Interrupt):
    """Another process owns this run now: stop without writing anything."""


class _StoreUnavailable(_Interrupt):
    """A checkpoint could not be written because the database is
    unavailable: the request answers ``503`` and the run, if it was stored,
    is resumed once its lease expires. An :class:`_Interrupt`, so that a
    view's ``except Exception`` cannot mistake it for a failed step."""

    def __init__(self, error: Exception) -> None:
        super().__init__(str(error))
        self.error = error


class StepNestingError(NonRetriableError, RuntimeError):
    """A ``step`` function was called inside a step function. Steps do not
    nest; this fails the outer step without retries."""
