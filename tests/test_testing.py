"""flask_durable.testing: a user's tests of durable views, without waiting."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from flask import Flask, jsonify, request

from flask_durable import Durable, NonRetriableError, StepError, current_run, step
from flask_durable.testing import DurableTester, InjectedFailure

pytest_plugins = ["pytester"]

#: Calls of each step's real function, by step id.
CALLS: dict[str, int] = {}


def _count(name: str, value: Any = None) -> Any:
    CALLS[name] = CALLS.get(name, 0) + 1
    return value


def make_app(tmp_path: Path, **config: Any) -> tuple[Flask, Durable]:
    app = Flask(__name__)
    app.config.update(
        DURABLE_DATABASE_URI=f"sqlite:///{tmp_path / 'durable.sqlite3'}",
        DURABLE_RETRY_BACKOFF=30,  # real waiting would make these tests slow
        DURABLE_RETRY_BACKOFF_MAX=600,
        **config,
    )
    durable = Durable(app)
    flaky = {"left": 2}

    def reserve(trip: str) -> dict[str, Any]:
        _count("reserve")
        if flaky["left"]:
            flaky["left"] -= 1
            raise ConnectionError("seat lock timed out")
        return {"trip": trip, "seat": "14A"}

    @app.post("/trips")
    @durable.endpoint
    def book() -> Any:
        trip = request.get_json()["trip"]
        seat = step.run("reserve", reserve, trip)
        step.sleep("cooling-off", "1d")
        approval = step.wait_for_event(
            "approval", event="trip/approved", match={"data.trip": trip}, timeout="7d"
        )
        if approval is None:
            return jsonify(status="expired", seat=seat), 410
        charge = step.run("charge", lambda: _count("charge", {"charged": 420}))
        return jsonify(status="booked", seat=seat, charge=charge, run=current_run.id)

    @app.post("/simple")
    @durable.endpoint
    def simple() -> Any:
        a = step.run("a", lambda: _count("a", 1))
        b = step.run("b", lambda: _count("b", 2))
        c = step.run("c", lambda: _count("c", 3))
        return jsonify(total=a + b + c)

    @durable.function("welcome", event="user/signup")
    def welcome(event: dict[str, Any]) -> str:
        step.sleep("wait-a-day", "1d")
        return str(step.run("email", lambda: _count("email", event["data"]["email"])))

    @durable.function("hourly", cron="0 * * * *")
    def hourly(event: dict[str, Any]) -> None:
        step.run("tick", lambda: _count("tick"))

    return app, durable


@pytest.fixture(autouse=True)
def _reset_calls() -> None:
    CALLS.clear()


@pytest.fixture
def app(tmp_path: Path) -> Iterator[Flask]:
    app, _ = make_app(tmp_path)
    yield app
    app.extensions["durable"].close()


def test_a_day_long_run_with_retries_and_an_approval(
    app: Flask, durable_tester: DurableTester
) -> None:
    before = set(threading.enumerate())
    client = app.test_client()
    start = durable_tester.now()

    r = client.post("/trips", json={"trip": "LIS"})
    # The first attempt failed: the run goes on in the background.
    assert r.status_code == 303
    run_id = r.headers["Durable-Run-Id"]

    # Following the wait URL runs the retries and the day's sleep at once,
    # then answers 202: the run waits for its approval.
    r = client.get(r.headers["Location"], follow_redirects=True)
    assert r.status_code == 202
    assert r.get_json()["status"] == "waiting"
    assert CALLS["reserve"] == 3
    assert (durable_tester.now() - start).total_seconds() >= 86400

    # An approval for another trip does not match.
    durable_tester.send("trip/approved", {"trip": "OPO"})
    assert durable_tester.get_run(run_id).status == "waiting"

    durable_tester.send("trip/approved", {"trip": "LIS"})
    run = durable_tester.get_run(run_id)
    assert run is not None and run.status == "completed"
    assert [s.id for s in run.steps] == ["reserve", "cooling-off", "approval", "charge"]
    assert run.steps[0].attempts == 3
    r = client.get(f"/durable/wait/{_token(client, run_id)}")
    assert r.status_code == 200 and r.get_json()["status"] == "booked"
    # No scheduler, timer or listener thread was started.
    assert set(threading.enumerate()) <= before


def _token(client: Any, run_id: str) -> str:
    app = client.application
    with app.test_request_context():
        return app.extensions["durable"].wait_url(run_id).rsplit("/", 1)[1]


def test_wait_timeout_fires_when_time_passes(
    app: Flask, durable_tester: DurableTester
) -> None:
    client = app.test_client()
    r = client.post("/trips", json={"trip": "LIS"}, follow_redirects=True)
    assert r.status_code == 202
    run_id = r.get_json()["run_id"]
    durable_tester.advance("6d")
    assert durable_tester.get_run(run_id).status == "waiting"
    durable_tester.advance("2d")
    run = durable_tester.get_run(run_id)
    assert run.status == "completed"
    assert "charge" not in [s.id for s in run.steps]


def test_fail_step_counts_attempts_and_then_succeeds(
    app: Flask, durable_tester: DurableTester
) -> None:
    durable_tester.fail_step("b", times=2)
    r = app.test_client().post("/simple", follow_redirects=True)
    assert r.status_code == 200 and r.get_json() == {"total": 6}
    run = durable_tester.get_run(r.headers["Durable-Run-Id"])
    b = {s.id: s for s in run.steps}["b"]
    assert b.attempts == 3
    assert [e["type"] for e in b.attempt_errors] == ["InjectedFailure"] * 2
    # The real function ran once, after the injected failures.
    assert CALLS == {"a": 1, "b": 1, "c": 1}


def test_fail_step_for_good(app: Flask, durable_tester: DurableTester) -> None:
    durable_tester.fail_step("b", error=NonRetriableError("card declined"))
    r = app.test_client().post("/simple", follow_redirects=True)
    assert r.status_code == 500
    run = durable_tester.get_run(r.headers["Durable-Run-Id"])
    assert run.status == "failed"
    assert "card declined" in (run.error or "")
    assert "c" not in CALLS


def test_mock_step(app: Flask, durable_tester: DurableTester) -> None:
    durable_tester.mock_step("b", 40)
    r = app.test_client().post("/simple")
    assert r.get_json() == {"total": 44}
    assert "b" not in CALLS
    durable_tester.unmock_step("b")
    assert app.test_client().post("/simple").get_json() == {"total": 6}


def test_crash_after_a_step_replays_without_running_it_again(
    app: Flask, durable_tester: DurableTester
) -> None:
    durable_tester.crash_after("b")
    client = app.test_client()
    r = client.post("/simple")
    assert r.status_code == 303
    run_id = r.headers["Durable-Run-Id"]
    assert durable_tester.get_run(run_id).status == "running"
    assert CALLS == {"a": 1, "b": 1}
    assert durable_tester.drain() == 1
    run = durable_tester.get_run(run_id)
    assert run.status == "completed" and run.attempt == 1
    # The replay returned a's and b's stored results.
    assert CALLS == {"a": 1, "b": 1, "c": 1}
    assert client.get(r.headers["Location"]).get_json() == {"total": 6}


def test_functions_and_cron_run_as_time_passes(
    app: Flask, durable_tester: DurableTester
) -> None:
    durable_tester.send("user/signup", {"email": "a@example.com"})
    assert "email" not in CALLS
    (run,) = durable_tester.runs(endpoint="welcome")
    assert run.status == "sleeping"
    ticks = CALLS.get("tick", 0)
    durable_tester.advance("1d")
    assert CALLS["email"] == 1
    assert durable_tester.get_run(run.id).output == "a@example.com"
    assert CALLS["tick"] - ticks in (24, 25)


def test_step_error_from_injected_failures_reaches_the_view(tmp_path: Path) -> None:
    app = Flask(__name__)
    app.config.update(
        DURABLE_DATABASE_URI=f"sqlite:///{tmp_path / 'd.sqlite3'}",
        DURABLE_RETRIES=1,
    )
    durable = Durable(app)

    @app.post("/pay")
    @durable.endpoint
    def pay() -> Any:
        try:
            step.run("charge", lambda: "ok")
        except StepError as e:
            return jsonify(declined=e.step_id), 402
        return jsonify(ok=True)

    with DurableTester(app) as tester:
        tester.fail_step("charge", times=2, error=InjectedFailure("declined"))
        r = app.test_client().post("/pay", follow_redirects=True)
        assert r.status_code == 402 and r.get_json() == {"declined": "charge"}
    app.extensions["durable"].close()


def test_close_gives_back_the_real_clock(app: Flask) -> None:
    from flask_durable import clock

    real = clock.now
    with DurableTester(app) as tester:
        tester.advance("2d")
        assert clock.now() - real() > 2 * 86400 - 1
    assert clock.now is real
    with pytest.raises(RuntimeError, match="not set up"):
        DurableTester(Flask("bare"))


def test_fixture_in_a_users_project(pytester: pytest.Pytester) -> None:
    """The plugin's fixture works in a project that only installed us."""
    pytester.makepyfile(
        """
        import pytest
        from flask import Flask, jsonify
        from flask_durable import Durable, step

        @pytest.fixture
        def app(tmp_path):
            app = Flask(__name__)
            app.config["DURABLE_DATABASE_URI"] = f"sqlite:///{tmp_path}/d.db"
            durable = Durable(app)

            @app.post("/slow")
            @durable.endpoint
            def slow():
                step.sleep("nap", "2h")
                return jsonify(done=step.run("x", lambda: 1))

            yield app
            app.extensions["durable"].close()

        def test_slow(app, durable_tester):
            r = app.test_client().post("/slow", follow_redirects=True)
            assert r.get_json() == {"done": 1}
        """
    )
    result = pytester.runpytest_inprocess("-q", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)


def test_the_documented_example(pytester: pytest.Pytester) -> None:
    """docs/testing.rst includes these files: they must pass as shown."""
    folder = Path(__file__).parent.parent / "docs" / "testing_example"
    for name in ("app.py", "test_app.py"):
        pytester.makepyfile(**{name[:-3]: (folder / name).read_text()})
    pytester.syspathinsert()
    result = pytester.runpytest_inprocess("-q", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=4)
