"""Durable Endpoints for Flask."""

from . import steps as step
from .context import current_run as current_run
from .context import current_step as current_step
from .errors import NonRetriableError as NonRetriableError
from .errors import RetryAfterError as RetryAfterError
from .errors import StepError as StepError
from .extension import Durable as Durable
from .records import RunInfo as RunInfo
from .records import RunStatus as RunStatus
from .records import StepInfo as StepInfo

__all__ = [
    "Durable",
    "NonRetriableError",
    "RetryAfterError",
    "RunInfo",
    "RunStatus",
    "StepInfo",
    "StepError",
    "current_run",
    "current_step",
    "step",
]
