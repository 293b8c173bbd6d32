"""``durable.logger`` over real HTTP: each line of a durable view is logged
once per run, however many times replays run it again; records logged
outside durable views pass; :class:`ReplayFilter` does the same for any
logger."""

from __future__ import annotations

import logging
import time
from collections import Counter
from typing import Any

import pytest
from flask import Flask, jsonify

from flask_durable import Durable, current_run, step
from flask_durable.observability import ReplayFilter

durable = Durable()
log = durable.logger
#: An app's own logger, with the same filter.
other = logging.getLogger("tests.test_logger.other")
other.addFilter(ReplayFilter())
failures: dict[str, int] = {}


@pytest.fixture
def db_url(any_db_url: str) -> str:
    """Every test here runs on SQLite and on PostgreSQL."""
    return any_db_url


@pytest.fixture(autouse=True)
def _capture(caplog: Any) -> Any:
    failures.clear()
    caplog.set_level(logging.INFO, logger=log.name)
    caplog.set_level(logging.INFO, logger=other.name)
    return caplog


def logged(caplog: Any) -> Counter[str]:
    return Counter(
        r.getMessage() for r in caplog.records if r.name in (log.name, other.name)
    )


def _flaky(name: str, times: int) -> str:
    log.info("calling %s", name)  # in the step: new work at each attempt
    left = failures.setdefault(name, times)
    if left > 0:
        failures[name] = left - 1
        raise ConnectionError(f"{name} is down")
    return name


def build(make_app: Any) -> Flask:
    app = make_app(durable)

    @app.post("/order")
    @durable.endpoint
    def order() -> Any:
        log.info("order received")
        other.info("order received (own logger)")
        reserved = step.run("reserve", _flaky, "reserve", 0)
        log.info("reserved")
        # Fails once: the run is replayed from the top to retry it.
        charged = step.run("charge", _flaky, "charge", 1)
        log.info("charged")
        step.sleep("cool-off", 0.3)  # the run is replayed again after it
        log.info("cooled off, attempt %d", current_run.attempt)
        return jsonify(reserved=reserved, charged=charged)

    @app.post("/approval")
    @durable.endpoint
    def approval() -> Any:
        log.info("waiting for approval")
        event = step.wait_for_event("approval", event="approved", timeout="1h")
        assert event is not None
        # The replay after the event finds the wait completed (a memoized
        # step): what follows it was never run before.
        log.info("approved by %s", event["data"]["by"])
        return jsonify(event["data"])

    @app.post("/branches")
    @durable.endpoint
    def branches() -> Any:
        def later() -> str:
            time.sleep(0.1)  # stored after "left": the last step stored
            return step.run("right", _flaky, "right", 0)

        left, right = step.parallel(lambda: step.run("left", _flaky, "left", 1), later)
        log.info("both done")
        return jsonify([left, right])

    @app.get("/plain")
    def plain() -> Any:
        log.info("plain view")
        return "ok"

    return app


def test_each_line_is_logged_once_per_run(
    make_app: Any, live_server: Any, caplog: Any
) -> None:
    server = live_server(build(make_app))
    r = server.post("/order")
    assert r.json() == {"reserved": "reserve", "charged": "charge"}
    # Three executions: the request, the retry of "charge", the wake-up.
    assert logged(caplog) == Counter(
        {
            "order received": 1,
            "order received (own logger)": 1,
            "calling reserve": 1,
            "reserved": 1,
            "calling charge": 2,  # two attempts: both ran
            "charged": 1,
            "cooled off, attempt 2": 1,
        }
    )


def test_retried_branch_logs_before_the_last_step_stored(
    make_app: Any, live_server: Any, caplog: Any
) -> None:
    """The replay retries branch "left" while branch "right" (stored last)
    has not been reached yet: the retry is new work, logged."""
    server = live_server(build(make_app))
    assert server.post("/branches").json() == ["left", "right"]
    assert logged(caplog) == Counter(
        {"calling left": 2, "calling right": 1, "both done": 1}
    )


def test_lines_after_a_completed_wait_are_logged(
    make_app: Any, live_server: Any, caplog: Any
) -> None:
    app = build(make_app)
    server = live_server(app)
    r = server.post("/approval", allow_redirects=False)
    assert r.status_code == 303
    with app.app_context():
        durable.send("approved", {"by": "ann"})
    assert server.get(r.headers["Location"]).json() == {"by": "ann"}
    assert logged(caplog) == Counter({"waiting for approval": 1, "approved by ann": 1})


def test_outside_durable_views_records_pass(
    make_app: Any, live_server: Any, caplog: Any
) -> None:
    server = live_server(build(make_app))
    assert server.get("/plain").text == "ok"
    log.info("no request at all")
    assert logged(caplog) == Counter({"plain view": 1, "no request at all": 1})


def test_a_logging_logger() -> None:
    assert isinstance(durable.logger, logging.Logger)
    assert durable.logger.name == "flask_durable.app"
    assert Durable().logger is durable.logger
    assert any(isinstance(f, ReplayFilter) for f in durable.logger.filters)
