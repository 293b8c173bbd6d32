"""``flask durable ...`` commands."""

from __future__ import annotations

import json
import signal
import threading
from datetime import datetime
from typing import Any

import click
from flask import current_app
from flask.cli import with_appcontext

from . import clock
from .durations import parse_duration
from .lifecycle import get_lifecycle
from .records import RunStatus

#: Runs deleted per transaction by ``flask durable prune``.
_PRUNE_BATCH = 500


@click.group("durable")
def durable_cli() -> None:
    """flask-durable: durable endpoints."""


def _fail(message: str) -> None:
    """Print ``message`` to stderr and exit with status 1."""
    raise click.ClickException(message)


def _when(value: datetime | None) -> str:
    return "" if value is None else value.isoformat(timespec="seconds")


def _json(value: Any) -> str:
    return json.dumps(value, indent=2, default=str, ensure_ascii=False)


@durable_cli.command("runs")
@click.option(
    "--status",
    type=click.Choice([s.value for s in RunStatus]),
    help="Only runs with this status.",
)
@click.option("--endpoint", help="Only runs of this endpoint id.")
@click.option(
    "--limit",
    type=click.IntRange(1, 1000),
    default=50,
    show_default=True,
    help="How many runs, newest first.",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@with_appcontext
def runs_command(
    status: str | None, endpoint: str | None, limit: int, as_json: bool
) -> None:
    """List runs, newest first."""
    found, cursor = get_lifecycle().list_runs(status, endpoint, None, limit, None)
    if as_json:
        rows = [
            {
                "id": r.id,
                "endpoint": r.endpoint,
                "status": r.status.value,
                "attempt": r.attempt,
                "created_at": _when(r.created_at),
                "updated_at": _when(r.updated_at),
                "finished_at": _when(r.finished_at) or None,
                "due_at": _when(r.due_at) or None,
                "error": r.error,
            }
            for r in found
        ]
        click.echo(_json({"runs": rows, "next_cursor": cursor}))
        return
    if not found:
        click.echo("no runs")
        return
    table = [("ID", "STATUS", "ENDPOINT", "ATTEMPT", "CREATED", "ERROR")]
    for r in found:
        error = (r.error or "").replace("\n", " ")
        if len(error) > 60:
            error = error[:59] + "…"
        table.append(
            (
                r.id,
                r.status.value,
                r.endpoint,
                str(r.attempt),
                _when(r.created_at),
                error,
            )
        )
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]) - 1)]
    for row in table:
        cells = [
            cell.ljust(width) for cell, width in zip(row[:-1], widths, strict=True)
        ]
        click.echo("  ".join([*cells, row[-1]]).rstrip())
    if cursor is not None:
        click.echo(
            f"(more runs: raise --limit, or use durable.list_runs(cursor={cursor!r}))"
        )


@durable_cli.command("flow")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@with_appcontext
def flow_command(as_json: bool) -> None:
    """Show each flow-control key's running and queued runs."""
    usage = get_lifecycle().flow_usage()
    if as_json:
        click.echo(_json({"keys": usage}))
        return
    if not usage:
        click.echo("no runs under flow-control limits")
        return
    table = [("KEY", "RUNNING", "QUEUED", "LIMIT")]
    for u in usage:
        limit = "" if u["limit"] is None else str(u["limit"])
        table.append((u["key"], str(u["running"]), str(u["queued"]), limit))
    widths = [max(len(row[i]) for row in table) for i in range(4)]
    for row in table:
        click.echo(
            "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
        )


@durable_cli.command("show")
@click.argument("run_id")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@with_appcontext
def show_command(run_id: str, as_json: bool) -> None:
    """Show a run and its steps."""
    info = get_lifecycle().get_run(run_id)
    if info is None:
        _fail(f"no run {run_id}")
        return
    if as_json:
        response = None
        if info.response is not None:
            code, headers, body = info.response
            response = {
                "status": code,
                "headers": headers,
                "body": body.decode("utf-8", "replace"),
            }
        click.echo(
            _json(
                {
                    "id": info.id,
                    "endpoint": info.endpoint,
                    "status": info.status.value,
                    "attempt": info.attempt,
                    "created_at": _when(info.created_at),
                    "finished_at": _when(info.finished_at) or None,
                    "due_at": _when(info.due_at) or None,
                    "error": info.error,
                    "steps": [
                        {
                            "id": s.id,
                            "status": s.status,
                            "attempts": s.attempts,
                            "output": s.output,
                            "error": s.error,
                            "started_at": _when(s.started_at) or None,
                            "finished_at": _when(s.finished_at) or None,
                            "due_at": _when(s.due_at) or None,
                            "attempt_errors": [
                                {k: v for k, v in e.items() if k != "traceback"}
                                for e in s.attempt_errors
                            ],
                        }
                        for s in info.steps
                    ],
                    "response": response,
                }
            )
        )
        return
    click.echo(f"run       {info.id}")
    click.echo(f"endpoint  {info.endpoint}")
    click.echo(f"status    {info.status.value}")
    click.echo(f"attempt   {info.attempt}")
    click.echo(f"created   {_when(info.created_at)}")
    if info.finished_at is not None:
        click.echo(f"finished  {_when(info.finished_at)}")
    if info.due_at is not None:
        click.echo(f"due       {_when(info.due_at)}")
    if info.error:
        click.echo(f"error     {info.error}")
    if info.response is not None:
        click.echo(f"response  {info.response[0]}")
    click.echo(f"steps     {len(info.steps)}")
    for s in info.steps:
        click.echo(f"  {s.id}  {s.status}  attempts={s.attempts}")
        for e in s.attempt_errors:
            click.echo(
                f"    attempt {e['attempt']}: {e['type']}: {e['message']}"
                f" ({_when(e['at'])})"
            )
        if s.error and not s.attempt_errors:
            click.echo(f"    {s.error['type']}: {s.error['message']}")


@durable_cli.command("retry")
@click.argument("run_id")
@with_appcontext
def retry_command(run_id: str) -> None:
    """Run a failed run again from its failed step."""
    try:
        found = get_lifecycle().retry(run_id)
    except ValueError as e:
        _fail(str(e))
        return
    if not found:
        _fail(f"no run {run_id}")
    click.echo(f"run {run_id} scheduled again")


@durable_cli.command("cancel")
@click.argument("run_id")
@with_appcontext
def cancel_command(run_id: str) -> None:
    """Cancel a run."""
    if not get_lifecycle().cancel(run_id):
        _fail(f"run {run_id} is unknown or already finished")
    click.echo(f"run {run_id} cancelled")


@durable_cli.command("rewind")
@click.argument("run_id")
@click.argument("step_id")
@with_appcontext
def rewind_command(run_id: str, step_id: str) -> None:
    """Run STEP_ID of a run, and every step after it, again."""
    try:
        found = get_lifecycle().rewind(run_id, step_id)
    except ValueError as e:
        _fail(str(e))
        return
    if not found:
        _fail(f"no run {run_id}")
    click.echo(f"run {run_id} rewound to step {step_id!r}")


@durable_cli.command("send")
@click.argument("name")
@click.argument("json_data", required=False)
@click.option("--id", "event_id", help="Event id (deduplicates).")
@with_appcontext
def send_command(name: str, json_data: str | None, event_id: str | None) -> None:
    """Send event NAME with JSON_DATA (default {})."""
    data: Any = None
    if json_data is not None:
        try:
            data = json.loads(json_data)
        except ValueError as e:
            raise click.BadParameter(f"not JSON: {e}", param_hint="JSON_DATA") from None
    try:
        sent = get_lifecycle().send(name, data, event_id)
    except (TypeError, ValueError) as e:
        _fail(str(e))
        return
    click.echo(sent)


def _duration(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
    if value is None:
        return None
    try:
        return parse_duration(value)
    except (TypeError, ValueError) as e:
        raise click.BadParameter(str(e)) from None


@durable_cli.command("prune")
@click.option(
    "--older-than",
    callback=_duration,
    help="Delete finished runs older than this (default DURABLE_RETENTION).",
)
@with_appcontext
def prune_command(older_than: float | None) -> None:
    """Delete finished runs (with their steps) finished long enough ago."""
    lifecycle = get_lifecycle()
    if older_than is None:
        older_than = lifecycle.config.retention
        if older_than is None:
            raise click.UsageError(
                "DURABLE_RETENTION is None (keep runs for ever): pass --older-than"
            )
    lifecycle.ensure_schema()
    before = clock.now() - older_than
    deleted = 0
    while True:
        n = lifecycle.store.prune(before, _PRUNE_BATCH)
        deleted += n
        if n == 0:
            break
    click.echo(f"deleted {deleted} runs")


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
