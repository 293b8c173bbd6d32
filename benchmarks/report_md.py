"""Print a results file as Markdown tables (for ``benchmarks/README.md``)::

.venv/bin/python benchmarks/report_md.py benchmarks/results/latest.json
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import fmt  # noqa: E402

#: Columns left out of the Markdown (kept in the JSON).
_SKIP = {"profile": {"cum_us"}}


def markdown(results: dict[str, Any]) -> str:
    out = [
        f"Run of {results['date']} ({results['mode']} mode, {results['seconds']} s,"
        f" {results['machine']['cpus']} cores, Python {results['machine']['python']},"
        f" Flask {results['machine']['flask']},"
        f" SQLAlchemy {results['machine']['sqlalchemy']})."
    ]
    for key, scenario in results["scenarios"].items():
        cols = [c for c in scenario["columns"] if c not in _SKIP.get(key, set())]
        out.append("")
        out.append(f"**{scenario['title']}**")
        out.append("")
        out.append("| " + " | ".join(cols) + " |")
        out.append("|" + "---|" * len(cols))
        for row in scenario["rows"]:
            cells = [fmt(row.get(c)).replace("|", "\\|") for c in cols]
            out.append("| " + " | ".join(cells) + " |")
        for note in scenario["notes"]:
            out.append("")
            out.append(f"- {note}")
    if results.get("failed"):
        out.append("")
        out.append(f"Failed scenarios: {', '.join(results['failed'])}")
    return "\n".join(out)


if __name__ == "__main__":
    path = sys.argv[1] if len(sys.argv) > 1 else "benchmarks/results/latest.json"
    with open(path) as f:
        print(markdown(json.load(f)))
