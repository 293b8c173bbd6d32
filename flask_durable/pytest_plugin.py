"""The pytest plugin of flask-durable: the ``durable_tester`` fixture.

Installed with the package (entry point ``pytest11``); it needs an ``app``
fixture that returns the Flask app under test, as pytest-flask does.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from flask import Flask

from .testing import DurableTester


@pytest.fixture
def durable_tester(app: Flask) -> Iterator[DurableTester]:
    """A :class:`~flask_durable.testing.DurableTester` for the ``app``
    fixture, closed after the test."""
    with DurableTester(app) as tester:
        yield tester
