"""Run the flask-durable benchmarks: ``make bench`` (full, under ~10
minutes) or ``python benchmarks/run.py --quick`` (smoke run, ~1 minute).

Prints a table per scenario and writes ``benchmarks/results/latest.json``
and ``latest.png`` (``quick.json`` / ``quick.png`` for ``--quick``) plus
``profile.txt``. See ``benchmarks/README.md``.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import json
import logging
import os
import platform
import sys
import time
import traceback
from collections.abc import Callable

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

from common import (  # noqa: E402
    RESULTS,
    Mode,
    Report,
    log,
    postgres_available,
    render,
    short_error,
)

SCENARIOS = ("inprocess", "http", "dbos", "growth", "profile")


def _load(name: str) -> Callable[[Mode, bool], list[Report]]:
    """Imported lazily, so that an import error (flask_durable being edited
    concurrently) is reported per scenario."""
    if name == "inprocess":
        import inprocess

        return inprocess.run
    if name == "http":
        import http_bench

        return http_bench.run
    if name == "dbos":
        import compare_dbos

        return compare_dbos.run
    if name == "growth":
        import growth

        return growth.run
    import profile_bench

    return profile_bench.run


class _Quiet(logging.Handler):
    """Library and scheduler log lines, one line each, at most 10 of a kind
    (a database restarting under a benchmark logs one per run); the rest
    are counted and summed up at the end."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.counts: collections.Counter[str] = collections.Counter()

    def emit(self, record: logging.LogRecord) -> None:
        text = record.getMessage().splitlines()[0][:200]
        kind = f"{record.name}: {text[:40]}"
        self.counts[kind] += 1
        if self.counts[kind] <= 10:
            extra = ""
            if record.exc_info and record.exc_info[1] is not None:
                extra = f" ({short_error(record.exc_info[1])})"
            print(f"  [{record.name}] {text}{extra}", file=sys.stderr, flush=True)

    def summary(self) -> list[str]:
        return [f"{n} x {kind}" for kind, n in self.counts.items() if n > 10]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run, ~1 minute")
    parser.add_argument(
        "--only",
        default=",".join(SCENARIOS),
        help=f"comma-separated scenarios among {', '.join(SCENARIOS)}",
    )
    parser.add_argument(
        "--no-postgres", action="store_true", help="SQLite only (no PostgreSQL rows)"
    )
    parser.add_argument("--out", help="results file (default results/latest.json)")
    args = parser.parse_args(argv)
    mode = Mode.make(args.quick)
    chosen = [s.strip() for s in args.only.split(",") if s.strip()]
    for name in chosen:
        if name not in SCENARIOS:
            parser.error(f"unknown scenario {name!r}")

    quiet = _Quiet()
    for name in ("flask_durable", "apscheduler"):
        logger = logging.getLogger(name)
        logger.addHandler(quiet)
        logger.propagate = False

    pg = not args.no_postgres
    pg_note = None
    if pg:
        why = postgres_available()
        if why is not None:
            pg = False
            pg_note = f"PostgreSQL skipped: {why}"
            log(pg_note)

    from importlib.metadata import version

    started = time.time()
    results: dict[str, object] = {
        "date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
        "mode": "quick" if mode.quick else "full",
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
            "flask": version("flask"),
            "sqlalchemy": version("sqlalchemy"),
        },
        "postgres": pg_note or ("used" if pg else "not requested"),
        "scenarios": {},
    }
    scenarios: dict[str, object] = results["scenarios"]  # type: ignore[assignment]
    text: list[str] = []
    failed = []
    for name in chosen:
        log(f"scenario {name} ...")
        t0 = time.time()
        reports = None
        for attempt in range(2):
            try:
                reports = _load(name)(mode, pg)
                break
            except Exception as e:
                # flask_durable may be mid-edit (import error) or the
                # database restarted under us: try once more.
                if attempt == 1:
                    traceback.print_exc()
                    failed.append(name)
                else:
                    log(f"scenario {name} failed ({short_error(e)}); retrying once")
                    time.sleep(5)
        took = time.time() - t0
        for report in reports or []:
            report.seconds = took / max(1, len(reports or []))
            scenarios[report.key] = report.as_dict()
            block = render(report)
            text.append(block)
            print(block, flush=True)
    results["seconds"] = round(time.time() - started, 1)
    results["log_summary"] = quiet.summary()
    if failed:
        results["failed"] = failed

    os.makedirs(RESULTS, exist_ok=True)
    stem = "quick" if mode.quick else "latest"
    out = args.out or os.path.join(RESULTS, f"{stem}.json")
    with open(out, "w") as f:
        json.dump(results, f, indent=2, default=str)
    from chart import draw

    png = os.path.splitext(out)[0] + ".png"
    drew = draw(results, png)
    print()
    print("\n\n".join(text))
    print(
        f"\nTotal {results['seconds']} s. Results: {out}"
        + (f", chart: {png}" if drew else " (no matplotlib: no chart)")
    )
    for line in quiet.summary():
        print(f"(logged {line})")
    if failed:
        print(f"FAILED scenarios: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
