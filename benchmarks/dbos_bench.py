"""DBOS Transact side of the comparison.

DBOS is never a dependency of flask-durable: it lives in its own venv,
``benchmarks/.venv-dbos`` (gitignored), created on first use. This file is
both

* the **driver** (run by that venv's Python with ``--serve``): launches DBOS
  on one database, registers a workflow of 3 steps (each returns a small
  dict, as the flask-durable benchmark view does), then answers commands on
  stdin with one JSON line each on stdout: ``run N`` runs N workflows one
  after the other and reports the seconds taken; ``quit`` shuts DBOS down;
* and the **client** (:class:`DbosProcess`), used by ``run.py`` in the
  project's venv, so DBOS batches can be interleaved with flask-durable ones.

Only DBOS's public API is used (``DBOS``, ``@DBOS.workflow``,
``@DBOS.step``, ``DBOS.launch``, ``DBOS.destroy``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
VENV = os.path.join(HERE, ".venv-dbos")
VENV_PYTHON = os.path.join(VENV, "bin", "python")
PACKAGES = ["dbos", "psycopg[binary]"]


# -- client side (project venv) ----------------------------------------------


def ensure_venv() -> str:
    """Create ``benchmarks/.venv-dbos`` with DBOS if missing; returns its
    Python."""
    if not os.path.exists(VENV_PYTHON):
        subprocess.run([sys.executable, "-m", "venv", VENV], check=True)
        subprocess.run(
            [VENV_PYTHON, "-m", "pip", "install", "-q", "--upgrade", "pip"],
            check=True,
        )
    probe = subprocess.run(
        [VENV_PYTHON, "-c", "import dbos, psycopg"], capture_output=True
    )
    if probe.returncode != 0:
        subprocess.run(
            [VENV_PYTHON, "-m", "pip", "install", "-q", *PACKAGES], check=True
        )
    return VENV_PYTHON


class DbosProcess:
    """A DBOS driver subprocess on one database."""

    def __init__(self, database_url: str, workdir: str) -> None:
        python = ensure_venv()
        env = dict(os.environ)
        env.pop("PYTHONPATH", None)
        self.proc = subprocess.Popen(
            [python, os.path.abspath(__file__), "--serve", database_url],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=workdir,
            env=env,
        )
        self.info = self._read()

    def _read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        while True:
            line = self.proc.stdout.readline()
            if not line:
                err = self.proc.stderr.read() if self.proc.stderr else ""
                raise RuntimeError(f"DBOS driver exited: {err[-2000:]}")
            line = line.strip()
            if line.startswith("{"):
                data: dict[str, Any] = json.loads(line)
                if "error" in data:
                    raise RuntimeError(f"DBOS driver: {data['error']}")
                return data

    def run(self, n: int) -> float:
        """Run ``n`` workflows; returns the seconds they took (measured in
        the driver, so the pipe is not counted)."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(f"run {n}\n")
        self.proc.stdin.flush()
        return float(self._read()["seconds"])

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                assert self.proc.stdin is not None
                self.proc.stdin.write("quit\n")
                self.proc.stdin.flush()
                self.proc.wait(timeout=30)
            except Exception:
                self.proc.kill()
                self.proc.wait()


# -- driver side (DBOS venv) -------------------------------------------------


def _settings(dbos: Any, url: str) -> dict[str, Any]:
    """The durability settings DBOS's own connections run with."""
    import sqlalchemy as sa

    found: dict[str, Any] = {}
    engine = None
    sys_db = getattr(dbos, "_sys_db", None)
    if sys_db is not None:
        engine = getattr(sys_db, "engine", None)
    if engine is None:
        return {"note": "could not read DBOS's engine"}
    with engine.connect() as conn:
        if url.startswith("sqlite"):
            found["journal_mode"] = conn.exec_driver_sql("PRAGMA journal_mode").scalar()
            sync = conn.exec_driver_sql("PRAGMA synchronous").scalar()
            found["synchronous"] = {0: "OFF", 1: "NORMAL", 2: "FULL", 3: "EXTRA"}.get(
                sync, sync
            )
        else:
            found["synchronous_commit"] = conn.execute(
                sa.text("SHOW synchronous_commit")
            ).scalar()
            found["fsync"] = conn.execute(sa.text("SHOW fsync")).scalar()
    return found


def serve(url: str) -> None:
    import logging

    from dbos import DBOS

    logging.disable(logging.WARNING)

    @DBOS.step()
    def work(i: int) -> dict[str, Any]:
        return {"i": i, "ok": True, "name": "step"}

    @DBOS.workflow()
    def three_steps() -> int:
        results = [work(i) for i in range(3)]
        return len(results)

    config: Any = {
        "name": "durable-bench",
        "system_database_url": url,
        "log_level": "ERROR",
    }
    dbos = DBOS(config=config)
    DBOS.launch()
    try:
        import importlib.metadata

        version = importlib.metadata.version("dbos")
    except Exception:
        version = "?"
    try:
        settings = _settings(dbos, url)
    except Exception as e:
        settings = {"note": f"could not read settings: {e}"}
    for _ in range(20):  # warm-up
        three_steps()
    print(json.dumps({"ready": True, "version": version, "settings": settings}))
    sys.stdout.flush()
    for line in sys.stdin:
        parts = line.split()
        if not parts:
            continue
        if parts[0] == "quit":
            break
        if parts[0] == "run":
            n = int(parts[1])
            t0 = time.perf_counter()
            for _ in range(n):
                if three_steps() != 3:
                    raise RuntimeError("unexpected workflow result")
            took = time.perf_counter() - t0
            print(json.dumps({"seconds": took}))
            sys.stdout.flush()
    DBOS.destroy()


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--serve":
        try:
            serve(sys.argv[2])
        except Exception as e:
            print(json.dumps({"error": f"{type(e).__name__}: {e}"}))
            sys.stdout.flush()
            raise
    else:
        print("usage: dbos_bench.py --serve DATABASE_URL", file=sys.stderr)
        sys.exit(2)
