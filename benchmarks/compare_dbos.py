"""Scenario 4: flask-durable vs DBOS Transact, same 3-step workflow.

DBOS runs in a subprocess of its own venv (see ``dbos_bench.py``); its
batches are interleaved with flask-durable's in the same rounds.

Equal durability: every commit reaches the disk before the caller goes on.
DBOS on SQLite uses its defaults (read back from its connections and shown
in the output: rollback journal, ``synchronous=FULL``); flask-durable is run
with ``DURABLE_SQLITE_SYNCHRONOUS="FULL"`` (WAL, every commit synced) for the
equal comparison, and with its default ``NORMAL`` for reference. On
PostgreSQL both use the server's ``synchronous_commit`` (on).

A flask-durable "workflow" is a whole request through Flask's test client
(routing, the view, ``jsonify``) while a DBOS workflow is a bare function
call, which favours DBOS.
"""

from __future__ import annotations

import os
import time
from typing import Any

from apps import close, make_app, requester
from common import (
    Mode,
    Report,
    Series,
    interleaved,
    pg_setting,
    recreate_pg_database,
    retrying,
)
from common import temp_dir as _temp_dir
from dbos_bench import DbosProcess

TARGET = 10.0


def run(mode: Mode, pg: bool) -> list[Report]:
    report = Report("dbos", "4. flask-durable vs DBOS Transact (3-step workflow)")
    dbs = ["sqlite"] + (["postgresql"] if pg else [])
    with _temp_dir("dbos") as workdir:
        for db in dbs:

            def measure(db: str = db) -> tuple[Series, dict[str, Any], str, str]:
                tag = time.monotonic_ns()
                if db == "sqlite":
                    dbos_url = f"sqlite:///{os.path.join(workdir, f'dbos-{tag}.db')}"
                    full_uri = f"sqlite:///{os.path.join(workdir, f'full-{tag}.db')}"
                    normal_uri = f"sqlite:///{os.path.join(workdir, f'nrm-{tag}.db')}"
                else:
                    dbos_url = recreate_pg_database("dbos_bench").replace(
                        "+psycopg", ""
                    )
                    full_uri = normal_uri = recreate_pg_database("durable_bench")
                dbos = DbosProcess(dbos_url, workdir)
                apps = []
                try:
                    settings = dbos.info.get("settings", {})
                    variants = {"dbos": dbos.run}
                    if db == "sqlite":
                        full = make_app(full_uri, synchronous="FULL")
                        normal = make_app(normal_uri, synchronous="NORMAL")
                        apps += [full, normal]
                        variants["fd_equal"] = requester(full, "/durable/3")
                        variants["fd_default"] = requester(normal, "/durable/3")
                        equal = "WAL, synchronous=FULL"
                        dbos_settings = (
                            f"journal_mode={settings.get('journal_mode')},"
                            f" synchronous={settings.get('synchronous')}"
                        )
                    else:
                        app = make_app(full_uri)
                        apps.append(app)
                        variants["fd_equal"] = requester(app, "/durable/3")
                        equal = f"synchronous_commit={pg_setting('synchronous_commit')}"
                        dbos_settings = (
                            f"synchronous_commit={settings.get('synchronous_commit')}"
                        )
                    s = interleaved(variants, mode, cap=5000)
                    return s, dbos.info, equal, dbos_settings
                finally:
                    dbos.close()
                    for app in apps:
                        close(app)

            s, info, equal, dbos_settings = retrying(f"dbos {db}", measure)
            version = info.get("version")
            report.data[f"dbos_{db}"] = {
                "version": version,
                "settings": info.get("settings"),
            }
            ratio = s.ratio("fd_equal", "dbos")
            report.row(
                db=db,
                system=f"DBOS {version}",
                settings=dbos_settings,
                workflows_s=s.rate("dbos"),
                ms_each=s.us("dbos") / 1e3,
                vs_dbos=1.0,
            )
            report.row(
                db=db,
                system="flask-durable sync",
                settings=equal + " (equal durability)",
                workflows_s=s.rate("fd_equal"),
                ms_each=s.us("fd_equal") / 1e3,
                vs_dbos=ratio,
                target=f">={TARGET:.0f}x",
                ok="yes" if ratio >= TARGET else "NO",
            )
            if "fd_default" in s.per_op:
                report.row(
                    db=db,
                    system="flask-durable sync",
                    settings="WAL, synchronous=NORMAL (default)",
                    workflows_s=s.rate("fd_default"),
                    ms_each=s.us("fd_default") / 1e3,
                    vs_dbos=s.ratio("fd_default", "dbos"),
                )
    report.note(
        "flask-durable sync mode commits each step before step.run returns;"
        " DBOS commits each step's output too. A flask-durable workflow here is"
        " a full request through Flask's test client; DBOS's is a direct call."
    )
    return [report]
