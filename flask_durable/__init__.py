"""Durable Endpoints for Flask."""

from . import steps as step
from .context import current_run as current_run
from .context import current_step as current_step
from .errors import NonRetriableError as NonRetriableError
from .errors import RetryAfterError as RetryAfterError
from .errors import StepError as StepError
from .extension import Durable as Durable

__all__ = [
    "Durable",
    "NonRetriableError",
    "RetryAfterError",
    "StepError",
    "current_run",
    "current_step",
    "step",
]
