"""The PNG chart of a results file (matplotlib, installed by ``make bench``
into the project's venv; without it the chart is skipped)."""

from __future__ import annotations

from typing import Any


def _rows(results: dict[str, Any], key: str) -> list[dict[str, Any]]:
    return results["scenarios"].get(key, {}).get("rows", [])


def draw(results: dict[str, Any], path: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(2, 3, figsize=(17, 9.5))
    fig.suptitle(
        f"flask-durable benchmarks ({results['date']}, {results['mode']} mode,"
        f" {results['machine']['cpus']} cores)"
    )

    ax = axes[0][0]
    rows = _rows(results, "inprocess")
    if rows:
        labels = [f"{r['db']}\n{r['checkpoint']}" for r in rows]
        x = range(len(rows))
        ax.bar([i - 0.2 for i in x], [r["plain_rps"] for r in rows], 0.4, label="plain")
        ax.bar(
            [i + 0.2 for i in x], [r["durable_rps"] for r in rows], 0.4, label="durable"
        )
        for i, r in enumerate(rows):
            ax.annotate(
                f"{r['ratio']:.2f}x",
                (i + 0.2, r["durable_rps"]),
                ha="center",
                va="bottom",
                fontsize=8,
            )
        ax.set_xticks(list(x), labels, fontsize=8)
        ax.set_ylabel("requests/s")
        ax.set_title("1. test client, 3 steps (ratio durable/plain)")
        ax.legend(fontsize=8)

    ax = axes[0][1]
    rows = _rows(results, "step_overhead")
    for db in sorted({r["db"] for r in rows}):
        mine = [r for r in rows if r["db"] == db]
        ax.plot(
            [r["steps"] for r in mine],
            [r["per_step_us"] for r in mine],
            marker="o",
            label=db,
        )
    if rows:
        ax.set_xscale("log")
        ax.set_xlabel("steps per run")
        ax.set_ylabel("us per step")
        ax.set_title("2. per-step overhead")
        ax.legend(fontsize=8)

    ax = axes[0][2]
    rows = _rows(results, "http")
    if rows:
        x = range(len(rows))
        for off, name in ((-0.2, "plain"), (0.2, "durable")):
            ax.bar(
                [i + off for i in x],
                [r[f"{name}_p50_ms"] for r in rows],
                0.4,
                label=f"{name} p50",
            )
            ax.scatter(
                [i + off for i in x],
                [r[f"{name}_p99_ms"] for r in rows],
                marker="_",
                s=400,
                color="black",
            )
        ax.set_xticks(
            list(x),
            [f"{r['db']}\n{r.get('checkpoint', '')}" for r in rows],
            fontsize=7,
        )
        ax.set_ylabel("latency ms (bar p50, tick p99)")
        ax.set_title("3. gunicorn over HTTP, light client")
        ax.legend(fontsize=8)

    ax = axes[1][0]
    rows = _rows(results, "dbos")
    if rows:
        labels = [
            f"{r['db']}\n{r['system'].replace('flask-durable', 'fd')}"
            + ("\n(equal)" if "equal" in str(r.get("settings")) else "")
            + ("\n(default)" if "default" in str(r.get("settings")) else "")
            for r in rows
        ]
        ax.bar(range(len(rows)), [r["workflows_s"] for r in rows])
        for i, r in enumerate(rows):
            ax.annotate(
                f"{r['vs_dbos']:.1f}x",
                (i, r["workflows_s"]),
                ha="center",
                va="bottom",
                fontsize=8,
            )
        ax.set_xticks(range(len(rows)), labels, fontsize=7)
        ax.set_yscale("log")
        ax.set_ylabel("workflows/s (log)")
        ax.set_title("4. vs DBOS Transact, 3-step workflow")

    ax = axes[1][1]
    rows = _rows(results, "growth")
    for db in sorted({r["db"] for r in rows}):
        mine = [r for r in rows if r["db"] == db]
        ax.plot(
            [int(r["runs"].replace(",", "")) for r in mine],
            [r["vs_smallest"] for r in mine],
            marker="o",
            label=db,
        )
    if rows:
        ax.axhspan(0.8, 1.2, color="green", alpha=0.1, label="target +-20%")
        ax.set_xscale("log")
        ax.set_ylim(0, 1.5)
        ax.set_xlabel("finished runs in the table")
        ax.set_ylabel("req/s vs smallest table")
        ax.set_title("5. cost as history grows")
        ax.legend(fontsize=8)

    ax = axes[1][2]
    rows = _rows(results, "profile")[:10]
    if rows:
        ax.barh(
            range(len(rows))[::-1],
            [r["own_us"] for r in rows],
        )
        ax.set_yticks(
            list(range(len(rows))[::-1]),
            [r["where"][-38:] for r in rows],
            fontsize=6,
        )
        ax.set_xlabel("own us per request (cProfile)")
        ax.set_title("6. profile: top own time")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True
