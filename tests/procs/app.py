"""A small app with durable endpoints, run in child processes by the
multi-process tests (Werkzeug server, ``flask run --reload``, gunicorn,
``flask durable worker``).

Configured by environment variables:

``DURABLE_TEST_DB``   SQLAlchemy URL of the durable database.
``DURABLE_TEST_DIR``  where the side-effect log and barrier files live.
``DURABLE_SCHEDULER`` ``0`` to run no scheduler in this process.
``DURABLE_WAIT_TIMEOUT``, ``DURABLE_WORKERS``: passed on when set.

Every step execution appends a ``start`` line and, unless its process dies,
an ``end`` line to ``$DURABLE_TEST_DIR/effects.log`` (``O_APPEND``, one
``write`` per line): retries cannot fake or hide them.
"""

from __future__ import annotations

import json
import os
import threading
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from flask import Flask, jsonify, request

from flask_durable import Durable, RetryAfterError, current_run, current_step, step

TEST_DIR = Path(os.environ.get("DURABLE_TEST_DIR", "."))
EFFECTS = TEST_DIR / "effects.log"
HOLD = TEST_DIR / "hold"

durable = Durable()


def _log(record: dict[str, Any]) -> None:
    line = (json.dumps(record, separators=(",", ":")) + "\n").encode()
    fd = os.open(EFFECTS, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)


def _marker(name: str, content: str) -> None:
    tmp = TEST_DIR / f".{name}.tmp"
    tmp.write_text(content)
    tmp.rename(TEST_DIR / name)


def _hold() -> None:
    """Block while the ``hold`` file exists (the test kills us meanwhile)."""
    deadline = time.monotonic() + 60
    while HOLD.exists() and time.monotonic() < deadline:
        time.sleep(0.02)


def effect(
    job: str,
    name: str,
    *,
    sleep: float = 0.0,
    fail_first: bool = False,
    retry_at: float | None = None,
    block: bool = False,
) -> dict[str, Any]:
    """The body of a step: a side effect recorded in the log."""
    x = uuid.uuid4().hex
    pid = os.getpid()
    attempt = current_step.attempt
    base = {"job": job, "run": current_run.id, "step": name, "pid": pid, "x": x}
    _log(dict(base, ev="start", attempt=attempt, t=time.time()))
    if block:
        _marker(f"inside-{job}", current_run.id)
        _hold()
    if sleep:
        time.sleep(sleep)
    if fail_first and attempt == 0:
        _log(dict(base, ev="end", outcome="error", t=time.time()))
        if retry_at is not None:
            raise RetryAfterError(
                "first attempt fails", datetime.fromtimestamp(retry_at, timezone.utc)
            )
        raise ConnectionError("first attempt fails")
    _log(dict(base, ev="end", outcome="ok", t=time.time()))
    return {"x": x, "pid": pid}


def broken_effect(job: str) -> dict[str, Any]:
    """Step ``b`` of ``/flaky``: fails (logged) while ``broken`` exists."""
    if (TEST_DIR / "broken").exists():
        raise RuntimeError("b is broken")
    return effect(job, "b")


@durable.function("fn-work", event="job/go")
def fn_work(event: dict[str, Any]) -> Any:
    """A 3-step function; ``block`` holds step ``two`` (killed meanwhile)."""
    job = event["data"]["job"]
    block = event["data"].get("block", False)
    one = step.run("one", effect, job, "one")
    two = step.run("two", effect, job, "two", block=block)
    three = step.run("three", effect, job, "three")
    return {
        "job": job,
        "pid": os.getpid(),
        "steps": {"one": one, "two": two, "three": three},
    }


@durable.function(
    "fn-throttled", event="throttle/go", throttle={"limit": 10, "period": "1s"}
)
def fn_throttled(event: dict[str, Any]) -> Any:
    """Starts at most 10 a second, across every process."""
    return step.run("work", effect, event["data"]["job"], "work")


def fn_tick(event: dict[str, Any]) -> Any:
    """Every minute: one run per tick across every process (registered
    only with ``DURABLE_TEST_CRON=1``; logs to ``ticks.log``)."""
    line = json.dumps({"tick": event["id"], "run": current_run.id, "pid": os.getpid()})
    fd = os.open(TEST_DIR / "ticks.log", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (line + "\n").encode())
    finally:
        os.close(fd)
    return event["id"]


if os.environ.get("DURABLE_TEST_CRON") == "1":
    durable.function("fn-tick", cron="* * * * *")(fn_tick)


def create_app() -> Flask:
    app = Flask(__name__, instance_path=str(TEST_DIR / "instance"))
    db = os.environ["DURABLE_TEST_DB"]
    app.config.update(
        SECRET_KEY="procs-secret",
        DURABLE_DATABASE_URI=db,
        DURABLE_LEASE_SECONDS=2,
        DURABLE_POLL_INTERVAL=0.2,
        DURABLE_RETRY_BACKOFF=0.05,
        DURABLE_RETRY_BACKOFF_MAX=0.2,
        DURABLE_WAIT_TIMEOUT=float(os.environ.get("DURABLE_WAIT_TIMEOUT", "5")),
        DURABLE_EVENT_KEY="procs-event-key",
        DURABLE_SCHEDULER=os.environ.get("DURABLE_SCHEDULER", "1") != "0",
    )
    if "DURABLE_WORKERS" in os.environ:
        app.config["DURABLE_WORKERS"] = int(os.environ["DURABLE_WORKERS"])
    if db.startswith("postgresql"):
        app.config["DURABLE_ENGINE_OPTIONS"] = {"pool_size": 4, "max_overflow": 16}
    durable.init_app(app)
    durable.dashboard_auth(lambda: request.headers.get("X-Admin") == "yes")

    @app.get("/health")
    def health() -> Any:
        return jsonify(
            pid=os.getpid(),
            ppid=os.getppid(),
            threads=sorted(t.name for t in threading.enumerate()),
        )

    @app.get("/status/<run_id>")
    def status(run_id: str) -> Any:
        run = durable.get_run(run_id)
        if run is None:
            return jsonify(error="unknown run"), 404
        return jsonify(
            id=run.id,
            status=run.status,
            steps=[
                {
                    "id": s.id,
                    "status": s.status,
                    "attempts": s.attempts,
                    "output": s.output,
                }
                for s in run.steps
            ],
            response=None
            if run.response is None
            else {"status": run.response[0], "body": run.response[2].decode()},
        )

    @app.post("/crash")
    @durable.endpoint
    def crash() -> Any:
        """``one`` commits; then ``mode=between`` blocks outside any step,
        ``mode=inside`` blocks inside step ``two``."""
        body = request.get_json()
        job, mode = body["job"], body["mode"]
        one = step.run("one", effect, job, "one")
        if mode == "between":
            _marker(f"between-{job}", current_run.id)
            _hold()
        two = step.run("two", effect, job, "two", block=mode == "inside")
        three = step.run("three", effect, job, "three")
        return jsonify(
            job=job, pid=os.getpid(), steps={"one": one, "two": two, "three": three}
        )

    @app.post("/work")
    @durable.endpoint
    def work() -> Any:
        """``a`` fails on its first attempt (when asked), ``b`` takes a
        while, ``c`` is quick."""
        body = request.get_json()
        job = body["job"]
        a = step.run(
            "a",
            effect,
            job,
            "a",
            fail_first=body.get("fail_once", True),
            retry_at=body.get("retry_at"),
        )
        b = step.run("b", effect, job, "b", sleep=body.get("sleep", 0.02))
        c = step.run("c", effect, job, "c")
        return jsonify(job=job, pid=os.getpid(), steps={"a": a, "b": b, "c": c})

    @app.post("/nap")
    @durable.endpoint
    def nap() -> Any:
        body = request.get_json()
        job = body["job"]
        a = step.run("a", effect, job, "a")
        if body.get("wait"):
            step.wait_for_event(
                "go", event="go", match={"data.job": job}, timeout="10m"
            )
        step.sleep("nap", body.get("nap", 3))
        b = step.run("b", effect, job, "b")
        return jsonify(job=job, pid=os.getpid(), steps={"a": a, "b": b})

    @app.post("/flaky")
    @durable.endpoint(retries=0)
    def flaky() -> Any:
        """``b`` fails for good while the file ``broken`` exists."""
        job = request.get_json()["job"]
        a = step.run("a", effect, job, "a")
        b = step.run("b", broken_effect, job)
        return jsonify(job=job, pid=os.getpid(), steps={"a": a, "b": b})

    @app.post("/limited")
    @durable.endpoint(concurrency={"limit": 3, "key": lambda r: "one-key"})
    def limited() -> Any:
        """At most 3 runs execute at once across every process; ``block``
        holds the step (the test kills the process meanwhile)."""
        body = request.get_json()
        job = body["job"]
        work = step.run(
            "work",
            effect,
            job,
            "work",
            sleep=body.get("sleep", 0.05),
            block=body.get("block", False),
        )
        return jsonify(job=job, pid=os.getpid(), steps={"work": work})

    @app.post("/talk")
    @durable.endpoint
    def talk() -> Any:
        """Streams words; with ``block``, holds after the second word of
        its first attempt (the test kills the process meanwhile)."""
        body = request.get_json()
        job = body["job"]

        def words() -> Any:
            for i, word in enumerate(["w0", "w1", "w2", "w3"]):
                if i == 2 and body.get("block"):
                    _marker(f"inside-{job}", current_run.id)
                    _hold()
                yield f"{word}@{os.getpid()}"

        said = step.stream("say", words)
        return jsonify(job=job, pid=os.getpid(), said=said)

    @app.post("/stall")
    @durable.endpoint
    def stall() -> Any:
        """``one`` commits, then plain view code (outside any step) takes
        ``pause`` seconds, then ``two`` and ``three``: the test SIGSTOPs the
        process during the pause, long enough for its lease to expire."""
        body = request.get_json()
        job = body["job"]
        one = step.run("one", effect, job, "one")
        time.sleep(float(body.get("pause", 3.0)))
        two = step.run("two", effect, job, "two")
        three = step.run("three", effect, job, "three")
        return jsonify(
            job=job, pid=os.getpid(), steps={"one": one, "two": two, "three": three}
        )

    return app


app = create_app()
