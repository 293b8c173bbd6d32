"""Take the screenshot of a run page shown in docs/dashboard.rst.

Not part of the test suite. Run from the repository root::

    python docs/screenshot.py [--out docs/_static/run-page.png]

It serves the app of ``tests/dashboard_app.py`` on loopback with a SQLite
file in a temporary directory, starts a run whose "charge" step fails twice
before it succeeds and that sleeps, waits for it to complete, and
photographs its page with Chromium (``/usr/bin/chromium``, or
``--chromium PATH``).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
from pathlib import Path

import requests
from playwright.sync_api import sync_playwright
from werkzeug.serving import make_server

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

import dashboard_app  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(ROOT / "docs/_static/run-page.png"))
    parser.add_argument("--chromium", default="/usr/bin/chromium")
    parser.add_argument("--width", type=int, default=1100)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        app = dashboard_app.build_app(Path(tmp) / "durable.sqlite3")
        server = make_server("127.0.0.1", 0, app, threaded=True)
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        url = f"http://127.0.0.1:{server.server_port}"
        try:
            started = requests.post(
                url + "/order",
                json={"order": "A-1042", "sleep": 1.5},
                headers={
                    "Authorization": "Bearer sk_live_do_not_show",
                    "Idempotency-Key": "order-A-1042",
                },
                allow_redirects=False,
                timeout=30,
            )
            run_id = started.headers["Durable-Run-Id"]
            dashboard_app.wait_status(app, run_id, "completed")
            _photograph(url, f"/durable/runs/{run_id}", args)
        finally:
            server.shutdown()
            server.server_close()
            app.extensions["durable"].close()
    print(f"saved {args.out}")


def _photograph(url: str, path: str, args: argparse.Namespace) -> None:
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=args.chromium)
        try:
            context = browser.new_context(
                viewport={"width": args.width, "height": 900},
                device_scale_factor=1,
                color_scheme="light",
            )
            context.add_cookies(
                [
                    {
                        "name": dashboard_app.ADMIN_COOKIE,
                        "value": dashboard_app.ADMIN_SECRET,
                        "url": url,
                    }
                ]
            )
            page = context.new_page()
            page.goto(url + path)
            # Open the first failed attempt, to show its traceback.
            page.locator(".attempts details").first.locator("summary").click()
            page.screenshot(path=args.out, full_page=True)
        finally:
            browser.close()


if __name__ == "__main__":
    main()
