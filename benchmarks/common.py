"""Timing, statistics and database helpers shared by the scenarios.

Every comparison is measured *side by side*: the variants being compared run
in alternating batches (rounds), the order rotating each round, so that
machine noise (another process, CPU frequency, the page cache) hits every
variant alike. Ratios are computed per round and their median reported.
"""

from __future__ import annotations

import gc
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")

PG_ADMIN_URL = os.environ.get(
    "BENCH_PG_ADMIN_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
)
PG_DATABASE = os.environ.get("BENCH_PG_DATABASE", "durable_bench")


def pg_url(database: str = PG_DATABASE) -> str:
    base = PG_ADMIN_URL.rsplit("/", 1)[0]
    return f"{base}/{database}"


@dataclass
class Mode:
    """How long the run may take: ``quick`` is a smoke run."""

    quick: bool
    rounds: int
    batch_seconds: float
    deadline: float = field(default=0.0)

    @classmethod
    def make(cls, quick: bool) -> Mode:
        if quick:
            return cls(quick=True, rounds=3, batch_seconds=0.12)
        return cls(quick=False, rounds=7, batch_seconds=0.35)


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", flush=True)


@contextmanager
def temp_dir(name: str) -> Iterator[str]:
    """A scratch directory under ``benchmarks/results`` (``*.tmp`` is
    gitignored), removed afterwards. It lives on the same disk as the
    project, so fsync costs are real ones (not a tmpfs)."""
    os.makedirs(RESULTS, exist_ok=True)
    path = tempfile.mkdtemp(prefix=f"{name}-", suffix=".tmp", dir=RESULTS)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def short_error(error: BaseException) -> str:
    text = f"{type(error).__name__}: {error}".splitlines()
    return (text[0] if text else type(error).__name__)[:300]


T = TypeVar("T")


def retrying(label: str, fn: Callable[[], T], attempts: int = 3) -> T:
    """``fn()``, tried again (up to ``attempts`` times) when it raises:
    the database may restart under a benchmark (other work on the machine).
    """
    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except Exception as e:
            if attempt == attempts:
                raise
            log(f"{label}: {short_error(e)}; retrying ({attempt}/{attempts - 1})")
            time.sleep(5)
    raise AssertionError("unreachable")


def calibrate(fn: Callable[[int], Any], seconds: float, cap: int = 100_000) -> int:
    """How many operations make a batch of about ``seconds``."""
    n = 1
    while True:
        t0 = time.perf_counter()
        fn(n)
        took = time.perf_counter() - t0
        if took >= seconds / 4 or n >= cap:
            break
        n *= 4
    per_op = max(took / n, 1e-7)
    return max(3, min(cap, int(seconds / per_op)))


@dataclass
class Series:
    """Seconds per operation, one value per round, for each variant."""

    per_op: dict[str, list[float]]
    batch: dict[str, int]

    def rate(self, name: str) -> float:
        """Operations per second (median over rounds)."""
        return 1.0 / statistics.median(self.per_op[name])

    def us(self, name: str) -> float:
        """Microseconds per operation (median over rounds)."""
        return statistics.median(self.per_op[name]) * 1e6

    def ratio(self, a: str, b: str) -> float:
        """Median over rounds of ``rate(a) / rate(b)``."""
        return statistics.median(
            pb / pa for pa, pb in zip(self.per_op[a], self.per_op[b], strict=True)
        )

    def spread(self, name: str) -> float:
        """Relative spread (max-min)/median of the rounds, for the table."""
        values = self.per_op[name]
        return (max(values) - min(values)) / statistics.median(values)


def interleaved(
    variants: dict[str, Callable[[int], Any]],
    mode: Mode,
    *,
    batch: dict[str, int] | None = None,
    rounds: int | None = None,
    cap: int = 100_000,
) -> Series:
    """Run each variant's ``fn(n)`` in alternating batches.

    ``fn(n)`` performs ``n`` operations. Batch sizes are calibrated so that
    each batch takes about ``mode.batch_seconds`` unless given. One warm-up
    batch per variant is not counted.
    """
    names = list(variants)
    for name in names:  # warm-up: first requests create tables, pools...
        variants[name](2)
    sizes = dict(batch or {})
    for name in names:
        if name not in sizes:
            sizes[name] = calibrate(variants[name], mode.batch_seconds, cap)
    per_op: dict[str, list[float]] = {name: [] for name in names}
    total = rounds or mode.rounds
    for r in range(total):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            n = sizes[name]
            gc.collect()
            t0 = time.perf_counter()
            variants[name](n)
            per_op[name].append((time.perf_counter() - t0) / n)
    return Series(per_op, sizes)


def percentile(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = (len(ordered) - 1) * p / 100.0
    lo = int(k)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


class Report:
    """What a scenario found: rows for the table and the JSON, and notes."""

    def __init__(self, key: str, title: str) -> None:
        self.key = key
        self.title = title
        self.columns: list[str] = []
        self.rows: list[dict[str, Any]] = []
        self.notes: list[str] = []
        self.data: dict[str, Any] = {}
        self.seconds = 0.0

    def row(self, **fields: Any) -> None:
        for name in fields:
            if name not in self.columns:
                self.columns.append(name)
        self.rows.append(fields)

    def note(self, text: str) -> None:
        self.notes.append(text)

    def as_dict(self) -> dict[str, Any]:
        return {
            "title": self.title,
            "seconds": round(self.seconds, 1),
            "columns": self.columns,
            "rows": self.rows,
            "notes": self.notes,
            "data": self.data,
        }


def fmt(value: Any) -> str:
    if isinstance(value, float):
        if value != value:
            return "-"
        if abs(value) >= 100:
            return f"{value:,.0f}"
        if abs(value) >= 10:
            return f"{value:.1f}"
        return f"{value:.2f}"
    if value is None:
        return "-"
    return str(value)


def render(report: Report) -> str:
    """The report as a plain-text table with its notes."""
    lines = [f"== {report.title} ({report.seconds:.0f} s)"]
    if report.rows:
        cols = report.columns
        cells = [[fmt(r.get(c)) for c in cols] for r in report.rows]
        widths = [
            max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)
        ]
        lines.append("  ".join(c.ljust(w) for c, w in zip(cols, widths, strict=True)))
        lines.append("  ".join("-" * w for w in widths))
        for row in cells:
            lines.append(
                "  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True))
            )
    for text in report.notes:
        lines.append(f"  * {text}")
    return "\n".join(lines)


# -- PostgreSQL ---------------------------------------------------------------


def postgres_available() -> str | None:
    """``None`` when the benchmark database can be used, else why not."""
    try:
        import sqlalchemy as sa

        engine = sa.create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
        with engine.connect() as conn:
            conn.execute(sa.text("SELECT 1"))
        engine.dispose()
    except Exception as e:  # pragma: no cover - depends on the machine
        return f"{type(e).__name__}: {e}".splitlines()[0]
    return None


def recreate_pg_database(database: str) -> str:
    """Drop and create ``database``; returns its SQLAlchemy URL."""
    import sqlalchemy as sa

    engine = sa.create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.execute(
            sa.text(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE datname = :d AND pid <> pg_backend_pid()"
            ),
            {"d": database},
        )
        conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{database}"'))
        conn.execute(sa.text(f'CREATE DATABASE "{database}"'))
    engine.dispose()
    return pg_url(database)


def pg_setting(name: str) -> str:
    import sqlalchemy as sa

    engine = sa.create_engine(PG_ADMIN_URL)
    with engine.connect() as conn:
        value = conn.execute(sa.text(f"SHOW {name}")).scalar()
    engine.dispose()
    return str(value)
