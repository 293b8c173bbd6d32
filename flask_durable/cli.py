"""``flask durable ...`` commands."""

from __future__ import annotations

import signal
import threading

import click
from flask import current_app
from flask.cli import with_appcontext

from .lifecycle import get_lifecycle


@click.group("durable")
def durable_cli() -> None:
    """flask-durable: durable endpoints."""


@durable_cli.command("worker")
@with_appcontext
def worker() -> None:
    """Run only the scheduler: resume due and crashed runs until stopped
    (web processes may then set DURABLE_SCHEDULER=False)."""
    lifecycle = get_lifecycle()
    lifecycle.ensure_ready(scheduler=True)
    stop = threading.Event()

    def _stop(signum: int, frame: object) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    click.echo(
        f"flask-durable worker for {current_app.name}: {lifecycle.store.engine.url!r}"
    )
    while not stop.wait(1.0):
        pass
    lifecycle.close()
    click.echo("flask-durable worker stopped")
