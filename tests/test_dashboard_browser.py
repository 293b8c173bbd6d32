"""The dashboard in a real browser: Chromium (Debian's ``/usr/bin/chromium``)
driven by Playwright against a threaded Werkzeug server on loopback, with
the runs in a SQLite file. The app is ``tests/dashboard_app.py``."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from conftest import LiveServer
from dashboard_app import (
    ADMIN_COOKIE,
    ADMIN_SECRET,
    FIXED,
    GATE,
    build_app,
    calls,
    durable,
    reset,
    wait_status,
)
from flask import Flask
from playwright.sync_api import (
    Browser,
    BrowserContext,
    Locator,
    Page,
    expect,
    sync_playwright,
)

CHROMIUM = "/usr/bin/chromium"

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(
        not os.path.exists(CHROMIUM),
        reason=f"the browser tests need Chromium at {CHROMIUM} (apt install chromium)",
    ),
]

expect.set_options(timeout=10_000)


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM)
        yield browser
        browser.close()


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[Flask, LiveServer]]:
    """The test app on a real server; a SQLite file under ``tmp_path``."""
    reset()
    app = build_app(tmp_path / "durable.sqlite3")
    server = LiveServer(app)
    try:
        yield app, server
    finally:
        GATE.set()  # let a held step finish
        server.stop()
        app.extensions["durable"].close()


def open_context(
    browser: Browser, server: LiveServer, **options: Any
) -> BrowserContext:
    """A browser context; with the admin cookie unless ``admin=False``."""
    admin = options.pop("admin", True)
    context = browser.new_context(**options)
    if admin:
        context.add_cookies(
            [{"name": ADMIN_COOKIE, "value": ADMIN_SECRET, "url": server.url}]
        )
    return context


@pytest.fixture
def page(browser: Browser, served: tuple[Flask, LiveServer]) -> Iterator[Page]:
    """A page of a browser the dashboard lets in; confirmations accepted.
    A script error or a Content-Security-Policy violation fails the test."""
    context = open_context(browser, served[1])
    page = context.new_page()
    page.on("dialog", lambda dialog: dialog.accept())
    problems: list[str] = []
    page.on("pageerror", lambda error: problems.append(str(error)))
    page.on(
        "console",
        lambda msg: (
            problems.append(msg.text) if "Content Security Policy" in msg.text else None
        ),
    )
    yield page
    context.close()
    assert problems == []


def start(server: LiveServer, path: str, **kw: Any) -> str:
    response = server.post(path, allow_redirects=False, **kw)
    assert response.status_code in (200, 303, 500), response.text
    return response.headers["Durable-Run-Id"]


def status_badge(page: Page) -> Locator:
    return page.locator(".run-head .run-status .badge")


def test_find_a_run_that_retried_and_read_its_attempts(
    served: tuple[Flask, LiveServer], page: Page
) -> None:
    app, server = served
    start(server, "/three")
    retried = start(
        server,
        "/order",
        json={"order": "A-1", "sleep": 0.05},
        headers={"Idempotency-Key": "checkout-41"},
    )
    start(server, "/three")
    wait_status(app, retried, "completed")

    page.goto(server.url + "/durable/")
    expect(page.locator("table.runs tbody tr")).to_have_count(3)
    page.select_option("select[name=endpoint]", "order")
    page.click("button:text('Filter')")
    expect(page.locator("table.runs tbody tr")).to_have_count(1)
    page.goto(server.url + "/durable/")
    page.fill("input[name=q]", "checkout-41")  # by idempotency key
    page.click("button:text('Filter')")
    expect(page.locator("table.runs tbody tr")).to_have_count(1)
    page.click(f"a:text('{retried}')")

    expect(page).to_have_url(f"{server.url}/durable/runs/{retried}")
    expect(status_badge(page)).to_have_text("completed")
    charge = page.locator('li[data-step="charge"]')
    failed = charge.locator(".attempts .attempt-failed")
    expect(failed).to_have_count(2)
    expect(failed.nth(0)).to_contain_text("Attempt 1 failed")
    expect(failed.nth(0)).to_contain_text("ConnectionError")
    expect(failed.nth(1)).to_contain_text("payment gateway timed out (call 2)")
    expect(charge.locator(".attempt-ok")).to_have_text("Attempt 3 succeeded")
    expect(charge.locator("svg rect.seg-failed")).to_have_count(2)
    traceback = failed.nth(0).locator("pre.traceback")
    expect(traceback).to_be_hidden()
    failed.nth(0).locator("summary").click()
    expect(traceback).to_be_visible()
    expect(traceback).to_contain_text("Traceback (most recent call last)")
    expect(traceback).to_contain_text("payment gateway timed out (call 1)")


def test_retry_a_fixed_run_and_see_it_complete_live(
    served: tuple[Flask, LiveServer], page: Page
) -> None:
    app, server = served
    run_id = start(server, "/broken")
    wait_status(app, run_id, "failed")
    page.goto(f"{server.url}/durable/runs/{run_id}")
    expect(status_badge(page)).to_have_text("failed")
    expect(page.locator(".run-error").first).to_contain_text(
        "card processor misconfigured"
    )

    FIXED["charge"] = True  # the fix is deployed; the step now holds on GATE
    page.click("button:text('Retry')")
    expect(page.locator(".alert.ok")).to_contain_text("Retry scheduled")
    expect(status_badge(page)).not_to_have_text("failed")
    expect(page.locator(".run-head .live")).to_be_visible()
    page.evaluate("window.stillTheSamePage = true")

    GATE.set()
    expect(status_badge(page)).to_have_text("completed")
    expect(page.locator('li[data-step="charge"] .output pre')).to_have_text('"charged"')
    expect(page.locator("#response .code-status")).to_have_text("200")
    assert page.evaluate("window.stillTheSamePage") is True  # no reload
    expect(page.locator(".run-head .live")).to_have_count(0)
    assert calls["broken"] == 3


def test_cancel_a_sleeping_run(served: tuple[Flask, LiveServer], page: Page) -> None:
    app, server = served
    run_id = start(server, "/nap")
    wait_status(app, run_id, "sleeping")
    page.goto(f"{server.url}/durable/runs/{run_id}")
    expect(status_badge(page)).to_have_text("sleeping")
    expect(page.locator('li[data-step="nap"] .pending')).to_contain_text(
        "sleeping until"
    )

    page.click("button:text('Cancel run')")
    expect(status_badge(page)).to_have_text("cancelled")
    expect(page.locator("#response .code-status")).to_have_text("409")
    expect(page.locator("button:text('Cancel run')")).to_have_count(0)
    with app.app_context():
        info = durable.get_run(run_id)
    assert info is not None and info.status == "cancelled"


def test_rewind_a_finished_run(served: tuple[Flask, LiveServer], page: Page) -> None:
    app, server = served
    run_id = start(server, "/three")
    wait_status(app, run_id, "completed")
    page.goto(f"{server.url}/durable/runs/{run_id}")
    output = page.locator('li[data-step="b"] .output pre')
    expect(output).to_have_text("1")

    page.select_option("select[name=step]", "b")
    page.click("button:text('Rewind')")
    expect(page.locator(".alert.ok")).to_contain_text("Rewound")
    expect(status_badge(page)).to_have_text("completed")
    expect(output).to_have_text("2")  # b ran again, and c after it
    expect(page.locator('li[data-step="c"] .output pre')).to_have_text("2")
    expect(page.locator('li[data-step="a"] .output pre')).to_have_text("1")
    assert (calls["a"], calls["b"], calls["c"]) == (1, 2, 2)


def test_send_an_event_to_a_waiting_run(
    served: tuple[Flask, LiveServer], page: Page
) -> None:
    app, server = served
    run_id = start(server, "/approve")
    wait_status(app, run_id, "waiting")
    page.goto(f"{server.url}/durable/runs/{run_id}")
    expect(page.locator('li[data-step="approval"] .pending')).to_contain_text(
        "waiting for an event until"
    )
    page.fill("input[name=name]", "order.approved")
    page.fill("textarea[name=data]", '{"by": ops}')  # not JSON
    page.click("button:text('Send event')")
    expect(page.locator(".alert.error:not([hidden])")).to_contain_text("must be JSON")
    expect(page.locator("textarea[name=data]")).to_have_value('{"by": ops}')

    page.fill("textarea[name=data]", '{"by": "ops"}')
    page.click("button:text('Send event')")
    expect(page.locator(".alert.ok")).to_contain_text("Event sent")
    expect(status_badge(page)).to_have_text("completed")
    expect(page.locator("#response pre")).to_contain_text('"by": "ops"')


def test_refused_without_auth(
    browser: Browser, served: tuple[Flask, LiveServer]
) -> None:
    app, server = served
    run_id = start(server, "/three")
    context = open_context(browser, server, admin=False)
    try:
        page = context.new_page()
        for path in ("/durable/", f"/durable/runs/{run_id}"):
            response = page.goto(server.url + path)
            assert response is not None and response.status == 403
            expect(page.locator("body")).to_contain_text("dashboard_auth")
            expect(page.locator("table, .waterfall")).to_have_count(0)
        api = page.request.get(f"{server.url}/durable/api/runs/{run_id}")
        assert api.status == 403
    finally:
        context.close()
    # The same page, with the cookie the callback wants, is served.
    allowed = requests.get(
        f"{server.url}/durable/runs/{run_id}",
        cookies={ADMIN_COOKIE: ADMIN_SECRET},
        timeout=10,
    )
    assert allowed.status_code == 200


def test_phone_viewport_has_no_horizontal_scroll(
    browser: Browser, served: tuple[Flask, LiveServer]
) -> None:
    app, server = served
    long_word = "x" * 600
    order = start(
        server,
        "/order",
        json={"order": "A-" + "9" * 120, "sleep": 0.05},
        headers={"X-Trace-Context": long_word},
    )
    echo = start(
        server, "/echo", data=long_word, headers={"Content-Type": "text/plain"}
    )
    wait_status(app, order, "completed")
    wait_status(app, echo, "completed")
    context = open_context(
        browser, server, viewport={"width": 390, "height": 844}, is_mobile=True
    )
    try:
        page = context.new_page()
        for path in ("/durable/", f"/durable/runs/{order}", f"/durable/runs/{echo}"):
            page.goto(server.url + path)
            page.evaluate(  # tracebacks open too
                "document.querySelectorAll('details').forEach(d => d.open = true)"
            )
            # Chromium widens a phone's layout viewport to fit wide content:
            # the page must stay 390 px wide, with nothing past its edge.
            width = page.evaluate(
                "[document.documentElement.scrollWidth, window.innerWidth]"
            )
            assert width == [390, 390], (path, width)
    finally:
        context.close()
