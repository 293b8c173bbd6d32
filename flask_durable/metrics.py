"""Prometheus metrics of one app (``DURABLE_METRICS``, extra
``[prometheus]``).

Each app has a :class:`~prometheus_client.CollectorRegistry` of its own
(never the global one), so that several apps in one process do not clash.
Counters and the step histogram are fed by the app's signals and its step
attempts; the gauges of unfinished runs are read from the database at each
scrape. ``docs/observability.rst`` lists every metric.

Imported only when ``DURABLE_METRICS`` is on: this module needs
``prometheus_client``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable
from typing import Any

from flask import Response, request
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector

from . import clock, signals
from .records import TERMINAL_STATUSES, Backlog, RunStatus
from .store import UNAVAILABLE

log = logging.getLogger("flask_durable")

#: Upper bounds (seconds) of the step duration buckets: from a cached
#: lookup to a slow third-party API.
STEP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)
#: The statuses of unfinished runs, each always exported (0 when none).
UNFINISHED = tuple(s.value for s in RunStatus if s.value not in TERMINAL_STATUSES)


class Metrics:
    """The metrics of one app.

    :param sender: the app: signals sent by it are counted.
    :param read_backlog: reads the unfinished runs (at each scrape).
    """

    def __init__(self, sender: Any, read_backlog: Callable[[], Backlog]) -> None:
        self.registry = registry = CollectorRegistry(auto_describe=True)
        self.backlog = BacklogCollector(read_backlog)
        registry.register(self.backlog)
        self.runs_started = Counter(
            "durable_runs_started",
            "Runs started by a request to a durable endpoint.",
            ["endpoint"],
            registry=registry,
        )
        self.runs_resumed = Counter(
            "durable_runs_resumed",
            "Executions of stored runs (replays: retries, wake-ups, recovery).",
            ["endpoint"],
            registry=registry,
        )
        self.runs_finished = Counter(
            "durable_runs_finished",
            "Runs finished, by final status (completed, failed, cancelled).",
            ["endpoint", "status"],
            registry=registry,
        )
        self.step_attempts = Counter(
            "durable_step_attempts",
            "Step attempts, by outcome: completed, error (retried later),"
            " failed (for good).",
            ["endpoint", "outcome"],
            registry=registry,
        )
        self.step_duration = Histogram(
            "durable_step_duration_seconds",
            "How long a step attempt ran, whatever its outcome.",
            ["endpoint"],
            buckets=STEP_BUCKETS,
            registry=registry,
        )
        #: The labelled children of the step metrics, by (endpoint, outcome).
        self._children: dict[tuple[str, str], tuple[Any, Any]] = {}
        # Bound methods are held weakly by blinker: this object lives as long
        # as the app's lifecycle that keeps it.
        signals.run_started.connect(self._started, sender=sender)
        signals.run_resumed.connect(self._resumed, sender=sender)
        signals.run_completed.connect(self._finished, sender=sender)
        signals.run_failed.connect(self._finished, sender=sender)

    def step_attempt(self, endpoint: str, outcome: str, seconds: float) -> None:
        """Count a step attempt that ended with ``outcome``."""
        key = (endpoint, outcome)
        children = self._children.get(key)
        if children is None:  # labels() costs a lock and a few microseconds
            children = self._children[key] = (
                self.step_attempts.labels(endpoint, outcome),
                self.step_duration.labels(endpoint),
            )
        children[0].inc()
        children[1].observe(seconds)

    def _started(self, sender: Any, *, endpoint: str, **extra: Any) -> None:
        self.runs_started.labels(endpoint).inc()

    def _resumed(self, sender: Any, *, endpoint: str, **extra: Any) -> None:
        self.runs_resumed.labels(endpoint).inc()

    def _finished(
        self, sender: Any, *, endpoint: str, status: str, **extra: Any
    ) -> None:
        self.runs_finished.labels(endpoint, status).inc()

    def scrape_registry(self) -> CollectorRegistry:
        """The registry a scrape reads: this app's, or, in the multi-process
        mode of ``prometheus_client`` (``PROMETHEUS_MULTIPROC_DIR`` set, as
        under gunicorn), one summing every process's counters, with this
        app's database gauges."""
        if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            return self.registry
        from prometheus_client.multiprocess import MultiProcessCollector

        registry = CollectorRegistry()
        MultiProcessCollector(registry)
        registry.register(self.backlog)
        return registry

    def view(self) -> Response:
        """``GET <prefix>/metrics``: the exposition, in the format the
        scraper asks for; ``403`` unless the dashboard's access rule
        allows the request."""
        from .access import check_access

        denied = check_access()
        if denied is not None:
            return denied
        encode, content_type = choose_encoder(request.headers.get("Accept", ""))
        return Response(encode(self.scrape_registry()), content_type=content_type)


class BacklogCollector(Collector):
    """Gauges of unfinished runs, read from the database at each scrape.

    When the database cannot be read the gauges are left out of the scrape
    (which still succeeds) and a warning is logged.
    """

    def __init__(self, read: Callable[[], Backlog]) -> None:
        self._read = read

    def describe(self) -> Iterable[Metric]:
        return self._families(None)

    def collect(self) -> Iterable[Metric]:
        try:
            backlog = self._read()
        except UNAVAILABLE as e:
            log.warning("metrics: the database cannot be read: %s", e)
            return []
        return self._families(backlog)

    @staticmethod
    def _families(backlog: Backlog | None) -> list[Metric]:
        runs = GaugeMetricFamily(
            "durable_runs",
            "Unfinished runs, by status (finished runs: durable_runs_finished).",
            labels=["status"],
        )
        due = GaugeMetricFamily(
            "durable_runs_due",
            "Runs due now that no process holds: work waiting for a worker.",
        )
        delay = GaugeMetricFamily(
            "durable_runs_due_delay_seconds",
            "How long the longest waiting due run has been due (0: none).",
        )
        if backlog is not None:
            counts = backlog.by_status
            for status in (*UNFINISHED, *sorted(set(counts) - set(UNFINISHED))):
                runs.add_metric([status], counts.get(status, 0))
            due.add_metric([], backlog.due)
            oldest = backlog.oldest_due_at
            waited = 0.0 if oldest is None else max(0.0, clock.now() - oldest)
            delay.add_metric([], waited)
        return [runs, due, delay]
