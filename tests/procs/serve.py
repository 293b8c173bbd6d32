"""Serve :mod:`procs.app` on Werkzeug's threaded server at
``127.0.0.1:$DURABLE_TEST_PORT`` (``python -m procs.serve``)."""

from __future__ import annotations

import os

from werkzeug.serving import make_server

from procs.app import app


def main() -> None:
    port = int(os.environ["DURABLE_TEST_PORT"])
    server = make_server("127.0.0.1", port, app, threaded=True)
    print(f"serving on {port} pid {os.getpid()}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
