"""Scenario 6: where the time of one sync-mode 3-step durable request on
SQLite goes (cProfile), written to ``results/profile.txt``."""

from __future__ import annotations

import cProfile
import io
import os
import pstats
import time

from apps import close, make_app, requester
from common import RESULTS, Mode, Report, temp_dir

TOP = 15


def _short(func: tuple[str, int, str]) -> str:
    filename, line, name = func
    if filename == "~":
        return name
    parts = filename.replace("\\", "/").split("/")
    for anchor in ("site-packages", "lib", "work"):
        if anchor in parts:
            parts = parts[len(parts) - parts[::-1].index(anchor) :]
            break
    if "flask_durable" in parts:
        parts = parts[parts.index("flask_durable") :]
    return f"{'/'.join(parts[-2:])}:{line}({name})"


_GROUPS = (
    ("sqlite3.", "sqlite3 C calls (execute, commit)"),
    ("psycopg", "psycopg"),
    ("/sqlalchemy/", "SQLAlchemy (Python)"),
    ("/flask_durable/", "flask_durable"),
    ("/werkzeug/", "Werkzeug"),
    ("/flask/", "Flask"),
    ("/json/", "json"),
    ("/blinker/", "blinker"),
    ("/itsdangerous/", "itsdangerous"),
    ("/benchmarks/", "benchmark app"),
)


def _group(func: tuple[str, int, str]) -> str:
    filename, _line, name = func
    where = filename.replace("\\", "/") + ":" + name
    for needle, label in _GROUPS:
        if needle in where:
            return label
    if filename == "~":
        return "other builtins"
    return "other Python (stdlib)"


def run(mode: Mode, pg: bool) -> list[Report]:
    report = Report("profile", "6. Profile: sync 3-step durable request, SQLite")
    n = 300 if mode.quick else 2000
    with temp_dir("profile") as workdir:
        app = make_app(f"sqlite:///{os.path.join(workdir, 'profile.sqlite3')}")
        try:
            fn = requester(app, "/durable/3")
            fn(50)  # warm-up
            t0 = time.perf_counter()
            fn(n)
            plain_us = (time.perf_counter() - t0) / n * 1e6
            profiler = cProfile.Profile()
            profiler.enable()
            fn(n)
            profiler.disable()
        finally:
            close(app)
    stats = pstats.Stats(profiler)
    total = stats.total_tt  # type: ignore[attr-defined]
    entries = stats.stats  # type: ignore[attr-defined]
    rows = []
    for func, (_cc, nc, tt, ct, _callers) in entries.items():
        rows.append((func, nc, tt, ct))
    by_cum = sorted(rows, key=lambda r: r[3], reverse=True)[:TOP]
    by_own = sorted(rows, key=lambda r: r[2], reverse=True)[:TOP]

    groups: dict[str, float] = {}
    for func, _nc, tt, _ct in rows:
        group = _group(func)
        groups[group] = groups.get(group, 0.0) + tt
    by_group = sorted(groups.items(), key=lambda kv: kv[1], reverse=True)

    out = io.StringIO()
    out.write(
        f"cProfile of {n} sync-mode 3-step durable requests on SQLite (WAL,"
        f" synchronous=NORMAL) through Flask's test client.\n"
        f"Unprofiled: {plain_us:.0f} us/request; profiled: {total / n * 1e6:.0f}"
        " us/request (cProfile inflates Python-heavy code).\n"
        "Columns: calls per request, own (tottime) and cumulative us per request,"
        " share of profiled total.\n\n"
    )
    for title, chosen, key in (
        (f"Top {TOP} by cumulative time", by_cum, 3),
        (f"Top {TOP} by own time", by_own, 2),
    ):
        out.write(f"{title}\n")
        out.write(f"{'calls/req':>9} {'own us':>8} {'cum us':>8} {'share':>6}  where\n")
        for func, nc, tt, ct in chosen:
            out.write(
                f"{nc / n:9.1f} {tt / n * 1e6:8.1f} {ct / n * 1e6:8.1f}"
                f" {(tt if key == 2 else ct) / total:6.1%}  {_short(func)}\n"
            )
        out.write("\n")
    out.write("Own time by package (us per request, profiled)\n")
    for group, tt in by_group:
        out.write(f"{tt / n * 1e6:9.1f} {tt / total:6.1%}  {group}\n")
    out.write("\n")
    full = io.StringIO()
    pstats.Stats(profiler, stream=full).sort_stats("cumulative").print_stats(40)
    out.write("pstats, top 40 by cumulative time:\n")
    out.write(full.getvalue())
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, "profile.txt"), "w") as f:
        f.write(out.getvalue())

    for func, nc, tt, ct in by_own:
        report.row(
            where=_short(func),
            calls_per_req=nc / n,
            own_us=tt / n * 1e6,
            cum_us=ct / n * 1e6,
            own_share=f"{tt / total:.1%}",
        )
    report.data["own_by_package"] = {g: tt / n * 1e6 for g, tt in by_group}
    report.data["unprofiled_us"] = plain_us
    report.data["profiled_us"] = total / n * 1e6
    report.data["top_cumulative"] = [
        {
            "where": _short(f),
            "calls": nc / n,
            "own_us": tt / n * 1e6,
            "cum_us": ct / n * 1e6,
        }
        for f, nc, tt, ct in by_cum
    ]
    report.note(
        f"{plain_us:.0f} us/request unprofiled; full listing (also by cumulative"
        " time) in benchmarks/results/profile.txt"
    )
    return [report]
