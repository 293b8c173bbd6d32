"""The engine's clock.

Every due time, lease and timestamp of flask-durable is read from
:data:`now`, which is :func:`time.time` (no extra call on the hot path).
:class:`flask_durable.testing.DurableTester` replaces it with a clock that
it moves forward, so that sleeps, retries and timeouts come due at once.
Call it as ``clock.now()``: a name imported with ``from`` would not see the
replacement.
"""

from __future__ import annotations

import time
from collections.abc import Callable

#: Seconds since the epoch, as :func:`time.time`.
now: Callable[[], float] = time.time
