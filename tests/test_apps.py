"""SPEC 6, apps and deploys: app ids sharing one database, rolling deploys,
endpoint ids registered twice, and plain views that cost nothing.

Everything goes over real HTTP against live servers whose schedulers run.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import sqlalchemy as sa
from conftest import FAST_CONFIG
from flask import Flask, jsonify, request

from flask_durable import Durable, RetryAfterError, RunStatus, current_run, step

durable = Durable()


@pytest.fixture
def db_url(any_db_url: str) -> str:
    """Every app test runs on SQLite and on PostgreSQL."""
    return any_db_url


def get_run(app: Flask, run_id: str) -> Any:
    with app.app_context():
        return durable.get_run(run_id)


def wait_for(check: Callable[[], Any], what: str, timeout: float = 8.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = check()
        if found:
            return found
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def start_scheduler(app: Flask) -> None:
    with app.app_context():
        durable.start()
    assert app.extensions["durable"].scheduler.running


# -- two app ids, one database -------------------------------------------------


def shared_app(
    make_app: Callable[..., Flask],
    name: str,
    executions: list[tuple[str, str, int]],
) -> Flask:
    """An app whose durable endpoints have the same ids in every app: the
    view and its step record which app executed which run."""
    app = make_app(DURABLE_APP_ID=f"app-{name}", DURABLE_SCHEDULER=False)
    failed: set[str] = set()

    def flaky(key: str) -> str:
        executions.append((name, current_run.id, current_run.attempt))
        if key not in failed:
            failed.add(key)
            raise RetryAfterError("not yet", 0.2)
        return name

    @app.post("/work")
    @durable.endpoint(id="work")
    def work() -> Any:
        key = request.get_json()["key"]
        executions.append((name, current_run.id, current_run.attempt))
        by = step.run("flaky", flaky, key)
        return jsonify(view_by=name, step_by=by, run_id=current_run.id)

    @app.post("/wait")
    @durable.endpoint(id="wait")
    def wait() -> Any:
        event = step.wait_for_event(
            "ev", event="go", match={"data.k": request.get_json()["k"]}, timeout="20s"
        )
        return jsonify(by=name, event=event)

    return app


def test_two_app_ids_share_a_database(
    make_app: Callable[..., Flask], live_server: Any
) -> None:
    executions: list[tuple[str, str, int]] = []
    apps = {n: shared_app(make_app, n, executions) for n in ("a", "b")}
    servers = {n: live_server(app) for n, app in apps.items()}
    # The same Idempotency-Keys and bodies on both apps: each app gets its own
    # runs.
    started: dict[str, list[tuple[str, str]]] = {"a": [], "b": []}
    for i in range(3):
        for n, server in servers.items():
            r = server.post(
                "/work",
                json={"key": f"k{i}"},
                headers={"Idempotency-Key": f"key-{i}"},
                allow_redirects=False,
            )
            assert r.status_code == 303, r.text
            started[n].append((r.headers["Durable-Run-Id"], r.headers["Location"]))
    ids = {n: [run_id for run_id, _ in runs] for n, runs in started.items()}
    assert not set(ids["a"]) & set(ids["b"])
    assert len(set(ids["a"] + ids["b"])) == 6
    # Every retry is due before any scheduler runs: the first sweep of "a"
    # finds b's runs due too, and must leave them to "b".
    time.sleep(0.4)
    start_scheduler(apps["a"])
    time.sleep(FAST_CONFIG["DURABLE_POLL_INTERVAL"])
    start_scheduler(apps["b"])

    bodies: dict[str, dict[str, Any]] = {}
    for n, runs in started.items():
        for run_id, location in runs:
            final = servers[n].get(location)
            assert final.status_code == 200, final.text
            assert final.headers["Durable-Run-Id"] == run_id
            assert final.json() == {"view_by": n, "step_by": n, "run_id": run_id}
            bodies[run_id] = final.json()

    # Each run was executed (first request and retry) by its own app only.
    owner = {run_id: n for n, runs in ids.items() for run_id in runs}
    assert executions, "nothing was recorded"
    wrong = [(n, run_id) for n, run_id, _ in executions if owner[run_id] != n]
    assert not wrong, f"runs executed by the other app: {wrong}"
    for run_id in owner:
        attempts = sorted(a for _, r, a in executions if r == run_id)
        assert attempts == [0, 0, 1, 1], (run_id, attempts)  # view + step, twice

    # Neither app sees the other's runs, nor serves their wait URLs.
    for n, other in (("a", "b"), ("b", "a")):
        for run_id in ids[n]:
            info = get_run(apps[n], run_id)
            assert info is not None and info.status == RunStatus.COMPLETED
            assert get_run(apps[other], run_id) is None
        for _, location in started[n]:
            assert servers[other].get(location).status_code == 404

    # A repeated key gets the run of its own app.
    for i in range(3):
        for n, server in servers.items():
            again = server.post(
                "/work", json={"key": f"k{i}"}, headers={"Idempotency-Key": f"key-{i}"}
            )
            assert again.status_code == 200
            assert again.headers["Durable-Run-Id"] == ids[n][i]
            assert again.json() == bodies[ids[n][i]]
    assert len(executions) == 4 * 6  # the repeats executed nothing


def test_events_belong_to_one_app(
    make_app: Callable[..., Flask], live_server: Any
) -> None:
    executions: list[tuple[str, str, int]] = []
    apps = {n: shared_app(make_app, n, executions) for n in ("a", "b")}
    servers = {n: live_server(app) for n, app in apps.items()}
    waiting: dict[str, tuple[str, str]] = {}
    for n, server in servers.items():
        r = server.post("/wait", json={"k": 1}, allow_redirects=False)
        assert r.status_code == 303
        waiting[n] = (r.headers["Durable-Run-Id"], r.headers["Location"])

    for app in apps.values():
        start_scheduler(app)
    with apps["a"].app_context():
        durable.send("go", {"k": 1}, id="event-1")
    done = servers["a"].get(waiting["a"][1])
    assert done.status_code == 200
    assert done.json()["by"] == "a" and done.json()["event"]["id"] == "event-1"

    # b's wait was not completed by a's event (delivery is synchronous in
    # send(); give b's scheduler a few sweeps anyway).
    time.sleep(4 * FAST_CONFIG["DURABLE_POLL_INTERVAL"])
    info = get_run(apps["b"], waiting["b"][0])
    assert info is not None
    assert info.status == RunStatus.WAITING
    assert [(s.id, s.status) for s in info.steps] == [("ev", "waiting")]

    # The same event id on b is b's own event, not a duplicate of a's.
    with apps["b"].app_context():
        durable.send("go", {"k": 1}, id="event-1")
    done = servers["b"].get(waiting["b"][1])
    assert done.status_code == 200
    assert done.json()["by"] == "b" and done.json()["event"]["id"] == "event-1"


@pytest.fixture
def named_apps(db_url: str, tmp_path: Path) -> Iterator[Callable[[str], Flask]]:
    """Apps with an import name of their own and no DURABLE_APP_ID."""
    apps: list[Flask] = []

    def factory(import_name: str) -> Flask:
        app = Flask(import_name, instance_path=str(tmp_path / import_name))
        app.config.update(
            SECRET_KEY="test-secret",
            DURABLE_DATABASE_URI=db_url,
            DURABLE_SCHEDULER=False,
            **FAST_CONFIG,
        )
        durable.init_app(app)
        apps.append(app)

        @app.post("/work")
        @durable.endpoint
        def work() -> Any:
            step.sleep("nap", "0.3s")
            return jsonify(by=app.import_name)

        return app

    yield factory
    for app in apps:
        app.extensions["durable"].close()


def test_default_app_id_is_the_import_name(
    named_apps: Callable[[str], Flask], live_server: Any
) -> None:
    one, two = named_apps("shop_one"), named_apps("shop_two")
    assert one.extensions["durable"].config.app_id == "shop_one"
    assert two.extensions["durable"].config.app_id == "shop_two"
    servers = [live_server(one), live_server(two)]
    started = []
    for server in servers:
        r = server.post("/work", allow_redirects=False)
        assert r.status_code == 303
        started.append((r.headers["Durable-Run-Id"], r.headers["Location"]))
    time.sleep(0.4)  # both runs are due: one's first sweep must leave two's
    start_scheduler(one)
    time.sleep(FAST_CONFIG["DURABLE_POLL_INTERVAL"])
    start_scheduler(two)
    for i, (run_id, location) in enumerate(started):
        other = 1 - i
        assert servers[other].get(location).status_code == 404
        assert get_run((one, two)[other], run_id) is None
        final = servers[i].get(location)
        assert final.status_code == 200
        assert final.json() == {"by": ("shop_one", "shop_two")[i]}
        assert get_run((one, two)[i], run_id).status == RunStatus.COMPLETED


# -- rolling deploys ---------------------------------------------------------------


def deployed_app(make_app: Callable[..., Flask], version: str, **config: Any) -> Flask:
    """One version of the app "shop" (both versions share its app id)."""
    app = make_app(DURABLE_APP_ID="shop", **config)
    calls: list[str] = []
    app.config["calls"] = calls

    if version == "new":

        @app.post("/work")
        @durable.endpoint(id="deployed-work")
        def work() -> Any:
            kind = request.args["kind"]
            if kind == "sleep":
                step.sleep("pause", "0.3s")
            else:
                step.run("flaky", flaky_once, calls)
            return jsonify(version="new", attempt=current_run.attempt)

    elif version == "old-plain":

        @app.post("/work")
        def work_not_durable_yet() -> Any:
            calls.append("old view")
            return jsonify(version="old")

    # Every version has a durable endpoint of its own.
    @app.post("/other")
    @durable.endpoint
    def other() -> Any:
        step.sleep("pause", "0.6s")
        return jsonify(other=version)

    return app


def flaky_once(calls: list[str]) -> str:
    calls.append("flaky")
    if len(calls) == 1:
        raise RetryAfterError("not yet", 0.3)
    return "ok"


@pytest.mark.parametrize("old", ["old-missing", "old-plain"])
@pytest.mark.parametrize("kind", ["sleep", "retry"])
def test_rolling_deploy_old_process_leaves_new_runs_alone(
    make_app: Callable[..., Flask], live_server: Any, old: str, kind: str
) -> None:
    new_app = deployed_app(make_app, "new", DURABLE_SCHEDULER=False)
    old_app = deployed_app(make_app, old)
    new_server, old_server = live_server(new_app), live_server(old_app)
    start_scheduler(old_app)

    r = new_server.post(f"/work?kind={kind}", allow_redirects=False)
    assert r.status_code == 303
    run_id, location = r.headers["Durable-Run-Id"], r.headers["Location"]
    pending = "sleeping" if kind == "sleep" else "scheduled"
    assert r.json()["status"] == pending

    # A run of old's own, due after the new one: once old's scheduler has
    # finished it, it has swept past the new run's due time.
    mine = old_server.post("/other")
    assert mine.status_code == 200 and mine.json() == {"other": old}
    time.sleep(4 * FAST_CONFIG["DURABLE_POLL_INTERVAL"])

    info = get_run(old_app, run_id)  # same app id: old sees it, as pending
    assert info is not None
    assert info.status == pending, info
    assert info.attempt == 0, "old's scheduler claimed the run"
    assert info.response is None and info.error is None
    assert old_app.config["calls"] == []  # old's plain /work never ran
    assert not info.status.is_terminal

    start_scheduler(new_app)
    final = new_server.get(location)
    assert final.status_code == 200, final.text
    assert final.json() == {"version": "new", "attempt": 1}
    assert get_run(old_app, run_id).status == RunStatus.COMPLETED


@pytest.mark.parametrize("change", ["path", "method"])
def test_replay_without_a_route_is_rescheduled_not_failed(
    make_app: Callable[..., Flask],
    live_server: Any,
    caplog: pytest.LogCaptureFixture,
    change: str,
) -> None:
    caplog.set_level(logging.WARNING, logger="flask_durable")

    def routes(app: Flask, rule: str, method: str) -> Flask:
        # One view (one code object): both versions register endpoint id
        # "routed", under a different URL rule.
        @app.route(rule, methods=[method])
        @durable.endpoint(id="routed")
        def work() -> Any:
            step.sleep("pause", "0.3s")
            return jsonify(done=True)

        return app

    v1 = routes(make_app(DURABLE_APP_ID="shop", DURABLE_SCHEDULER=False), "/v1", "POST")
    if change == "path":
        v2 = routes(make_app(DURABLE_APP_ID="shop"), "/v2", "POST")
    else:
        v2 = routes(make_app(DURABLE_APP_ID="shop"), "/v1", "PUT")
    assert v2.extensions["durable"].endpoints() == ("routed",)
    r = live_server(v1).post("/v1", allow_redirects=False)
    assert r.status_code == 303
    run_id = r.headers["Durable-Run-Id"]
    before = time.time()
    start_scheduler(v2)

    def rescheduled() -> Any:
        info = get_run(v2, run_id)
        return info if info.attempt >= 1 and info.status != "running" else None

    info = wait_for(rescheduled, "v2 to try the run")
    assert info.status == RunStatus.SCHEDULED, info
    assert info.response is None and info.error is None
    assert info.due_at is not None and info.due_at.timestamp() > before + 5
    assert [(s.id, s.status) for s in info.steps] == [("pause", "sleeping")]
    assert any(
        run_id in rec.getMessage() and "no route" in rec.getMessage()
        for rec in caplog.records
        if rec.name == "flask_durable"
    )
    # Still scheduled a few sweeps later: nothing failed it meanwhile.
    time.sleep(3 * FAST_CONFIG["DURABLE_POLL_INTERVAL"])
    again = get_run(v2, run_id)
    assert again.status == RunStatus.SCHEDULED and again.attempt == info.attempt


# -- endpoint ids registered twice -------------------------------------------------


def test_same_explicit_id_on_two_views_fails_at_decoration() -> None:
    d = Durable()

    def book() -> str:
        return "book"

    def book_again() -> str:
        return "again"

    d.endpoint(id="book")(book)
    with pytest.raises(ValueError, match="'book'") as e:
        d.endpoint(id="book")(book_again)
    assert "book" in str(e.value)
    # The same view decorated again (an app factory called twice) is fine.
    d.endpoint(id="book")(book)


def colliding_app(make_app: Callable[..., Flask], d: Durable) -> Flask:
    app = make_app()

    @app.post("/pay")
    @d.endpoint(id="checkout")
    def pay() -> str:
        return step.run("charge", lambda: "paid")

    @app.post("/legacy", endpoint="checkout")
    @d.endpoint
    def legacy_checkout() -> str:
        return "legacy"

    return app


def test_resolved_id_collision_fails_at_start(
    make_app: Callable[..., Flask],
) -> None:
    app = colliding_app(make_app, durable)
    with app.app_context(), pytest.raises(ValueError) as e:
        durable.start()
    message = str(e.value)
    assert "'pay'" in message and "'checkout'" in message
    assert not app.extensions["durable"].scheduler.running


def test_resolved_id_collision_fails_at_first_durable_request(
    make_app: Callable[..., Flask],
) -> None:
    app = colliding_app(make_app, durable)
    app.testing = True  # the view's exception reaches the client
    with pytest.raises(ValueError, match="'pay'") as e:
        app.test_client().post("/pay")
    assert "'checkout'" in str(e.value)


def test_app_factory_called_twice(
    make_app: Callable[..., Flask], live_server: Any
) -> None:
    d = Durable()

    def create_app() -> Flask:
        # make_app set the app up; ``d`` is the factory's own extension
        # object (its state lives in the app, its endpoint ids in ``d``).
        app = make_app()

        @app.post("/pay")
        @d.endpoint(id="pay")
        def pay() -> Any:
            return jsonify(paid=step.run("charge", lambda: 42))

        return app

    first, second = create_app(), create_app()
    for app in (first, second):
        with app.app_context():
            d.start()
        r = live_server(app).post("/pay")
        assert r.status_code == 200 and r.json() == {"paid": 42}
        assert app.extensions["durable"].endpoints() == ("pay",)


# -- plain views cost nothing ---------------------------------------------------------


class SQLWatch:
    """Records every statement, pool check-out and new connection of the
    store's engine, with the path of the request whose thread made it
    (``None`` off request threads)."""

    def __init__(self, app: Flask) -> None:
        self.engine = app.extensions["durable"].store.engine
        self.local = threading.local()
        self.seen: list[tuple[int, str, str | None]] = []
        self.lock = threading.Lock()
        inner = app.wsgi_app

        def outer(environ: Any, start_response: Any) -> Any:
            self.local.path = environ["PATH_INFO"]
            try:
                return inner(environ, start_response)
            finally:
                self.local.path = None

        app.wsgi_app = outer  # type: ignore[method-assign]
        self.events = {
            "before_cursor_execute": self._statement,
            "checkout": self._checkout,
            "connect": self._checkout,
        }
        for name, fn in self.events.items():
            sa.event.listen(self.engine, name, fn)

    def _record(self, kind: str) -> None:
        with self.lock:
            self.seen.append(
                (threading.get_ident(), kind, getattr(self.local, "path", None))
            )

    def _statement(self, *args: Any) -> None:
        self._record("statement")

    def _checkout(self, *args: Any) -> None:
        self._record("connection")

    def on(self, path: str) -> list[tuple[int, str, str | None]]:
        with self.lock:
            return [s for s in self.seen if s[2] == path]

    def remove(self) -> None:
        for name, fn in self.events.items():
            sa.event.remove(self.engine, name, fn)


def plain_and_durable(app: Flask, idents: list[int]) -> Flask:
    @app.get("/plain")
    def plain() -> Any:
        idents.append(threading.get_ident())
        return jsonify(plain=True)

    @app.post("/durable")
    @durable.endpoint
    def durable_view() -> Any:
        return jsonify(value=step.run("one", lambda: 1))

    return app


def durable_hooks(app: Flask) -> list[Any]:
    hooks = [
        app.before_request_funcs,
        app.after_request_funcs,
        app.teardown_request_funcs,
        app.url_value_preprocessors,
        app.url_default_functions,
    ]
    # Hooks of the extension's own blueprints (the dashboard's access check)
    # run for their routes only: what counts is what runs for every view.
    found = [
        fn
        for registry in hooks
        for fn in registry.get(None, [])
        if getattr(fn, "__module__", "").startswith("flask_durable")
    ]
    found += [
        fn
        for fn in app.teardown_appcontext_funcs
        if getattr(fn, "__module__", "").startswith("flask_durable")
    ]
    return found


def test_plain_views_make_no_sql_and_have_no_hooks(
    make_app: Callable[..., Flask], live_server: Any
) -> None:
    idents: list[int] = []
    app = plain_and_durable(make_app(), idents)
    server = live_server(app)
    r = server.post("/durable")
    assert r.status_code == 200 and r.json() == {"value": 1}  # tables exist now
    wait_for(lambda: app.extensions["durable"].scheduler.running, "the scheduler")
    assert durable_hooks(app) == []

    watch = SQLWatch(app)
    try:
        for _ in range(5):
            p = server.get("/plain")
            assert p.status_code == 200 and p.json() == {"plain": True}
            assert "Durable-Run-Id" not in p.headers
        # The watch sees a durable request's SQL (an Idempotency-Key is
        # looked up with a statement on the request thread).
        d = server.post("/durable", headers={"Idempotency-Key": "watch"})
        assert d.status_code == 200
        time.sleep(2 * FAST_CONFIG["DURABLE_POLL_INTERVAL"])  # a sweep or two
    finally:
        watch.remove()
    assert len(idents) == 5
    assert watch.on("/plain") == []
    assert watch.on("/durable"), "the watch saw no SQL of the durable request"
    # Other SQL meanwhile came from the extension's own threads.
    assert any(path is None for _, _, path in watch.seen)


def test_first_plain_request_does_not_wait_for_the_database(
    make_app: Callable[..., Flask], live_server: Any
) -> None:
    idents: list[int] = []
    app = plain_and_durable(make_app(), idents)
    lifecycle = app.extensions["durable"]
    watch = SQLWatch(app)  # before anything touched the database
    try:
        assert watch.seen == []
        server = live_server(app)
        p = server.get("/plain")
        assert p.status_code == 200 and p.json() == {"plain": True}
        assert watch.on("/plain") == []
        wait_for(lambda: lifecycle.scheduler.running, "the scheduler to start")
        assert any(path is None for _, _, path in watch.seen)  # it did, elsewhere
        assert watch.on("/plain") == []
        assert durable_hooks(app) == []
        assert requests.get(server.url + "/plain", timeout=10).status_code == 200
        assert watch.on("/plain") == []
    finally:
        watch.remove()
    assert len(idents) == 2
    inspector = sa.inspect(lifecycle.store.engine)
    assert "durable_runs" in inspector.get_table_names()
