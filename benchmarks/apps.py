"""The apps the benchmarks drive: one plain view and the same view as a
durable endpoint, side by side in one Flask app.

``/plain/<k>`` calls a small function ``k`` times; ``/durable/<k>`` calls it
through ``k`` ``step.run`` calls. Both answer the same JSON. ``bare_app()``
is the plain view in an app without flask-durable at all (and the same
``SECRET_KEY``), to show what merely installing the extension costs other
views.

``http_app()`` is the factory gunicorn loads (``apps:http_app()``),
configured from ``BENCH_*`` environment variables.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from flask import Flask, jsonify

from flask_durable import Durable, step

#: Given to every app, the bare one too: in an app without ``SECRET_KEY``
#: Flask builds no session serializer (``open_session`` falls back to a null
#: session at once), which alone made the bare app look ~15% faster.
SECRET_KEY = "bench-secret"


def work(i: int) -> dict[str, Any]:
    """The body of a step: returns a small dict."""
    return {"i": i, "ok": True, "name": "step"}


def _add_plain(app: Flask) -> None:
    @app.get("/plain/<int:k>")
    def plain(k: int) -> Any:
        results = [work(i) for i in range(k)]
        return jsonify(n=len(results), last=results[-1])


def make_app(
    uri: str,
    *,
    checkpoint: str = "sync",
    synchronous: str = "NORMAL",
    scheduler: bool = True,
    **config: Any,
) -> Flask:
    """An app with ``/plain/<k>`` and ``/durable/<k>`` on ``uri``.

    Everything not given keeps flask-durable's defaults (SQLite: WAL with
    ``synchronous=NORMAL``; ``DURABLE_CHECKPOINT="sync"``; scheduler on).
    """
    app = Flask("bench")
    app.config.update(
        SECRET_KEY=SECRET_KEY,
        DURABLE_DATABASE_URI=uri,
        DURABLE_CHECKPOINT=checkpoint,
        DURABLE_SQLITE_SYNCHRONOUS=synchronous,
        DURABLE_SCHEDULER=scheduler,
    )
    app.config.update(config)
    durable = Durable(app)
    _add_plain(app)

    @app.get("/durable/<int:k>")
    @durable.endpoint
    def durable_view(k: int) -> Any:
        results = [step.run(f"s{i}", work, i) for i in range(k)]
        return jsonify(n=len(results), last=results[-1])

    return app


def bare_app() -> Flask:
    """The plain view in an app without flask-durable, with the same
    ``SECRET_KEY`` as :func:`make_app`'s app (so that the two differ only by
    the extension)."""
    app = Flask("bench_bare")
    app.config.update(SECRET_KEY=SECRET_KEY)
    _add_plain(app)
    return app


def close(app: Flask) -> None:
    """Stop the app's scheduler and close its connections
    (``app.extensions["durable"]`` is the app's ``Lifecycle``)."""
    lifecycle = app.extensions.get("durable")
    if lifecycle is not None:
        lifecycle.close()


@contextmanager
def running(uri: str, **kwargs: Any) -> Iterator[Flask]:
    """:func:`make_app`, shut down (scheduler, connections) afterwards."""
    app = make_app(uri, **kwargs)
    try:
        yield app
    finally:
        close(app)


def requester(app: Flask, path: str) -> Any:
    """``fn(n)``: ``n`` GET requests of ``path`` through the test client,
    each checked for a 200."""
    client = app.test_client()

    def fn(n: int) -> None:
        get = client.get
        for _ in range(n):
            response = get(path)
            if response.status_code != 200:
                raise RuntimeError(
                    f"GET {path} answered {response.status_code}:"
                    f" {response.get_data(as_text=True)[:300]}"
                )

    return fn


def http_app() -> Flask:
    """The app gunicorn serves in the HTTP scenario."""
    return make_app(
        os.environ["BENCH_DB_URI"],
        checkpoint=os.environ.get("BENCH_CHECKPOINT", "sync"),
        synchronous=os.environ.get("BENCH_SQLITE_SYNCHRONOUS", "NORMAL"),
    )
