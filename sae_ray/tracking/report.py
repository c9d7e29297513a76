"""The sweep's report: the summary table, the L0/FVU frontier plot, and what goes into the
parent MLflow run (those files, producer figures); then each registered model's aliases and
description (`registry.refresh_model`). No Ray.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

from sae_ray import tracking
from sae_ray.sweep.plan import SUMMARY_COLUMNS


def format_table(rows: list[dict[str, Any]], columns: list[str] = SUMMARY_COLUMNS) -> str:
    """Rows as a plain-text table: one line per row, `-` for a missing value, floats to 4 figures."""

    def cell(v: Any) -> str:
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v)

    body = [[cell(row.get(c)) for c in columns] for row in rows]
    widths = [max(len(c), *(len(b[i]) for b in body)) if body else len(c) for i, c in enumerate(columns)]
    line = lambda cells: "  ".join(x.ljust(w) for x, w in zip(cells, widths))  # noqa: E731
    return "\n".join([line(columns), line(["-" * w for w in widths]), *map(line, body)])


def plot_frontier(rows: list[dict[str, Any]], path: Path) -> None:
    """L0 (log scale) against FVU, one series per architecture and hook: the sparsity/fidelity
    frontier. Each target L0 of a ladder is a dotted vertical line, where the architectures'
    points meet for a like-for-like comparison."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if r["l0"] is not None and r["fvu"] is not None]  # stopped SAEs have no figures
    fig, ax = plt.subplots(figsize=(6, 4))
    for key in sorted({(r["architecture"], r["hook"]) for r in rows}):
        pts = sorted((r["l0"], r["fvu"]) for r in rows if (r["architecture"], r["hook"]) == key)
        ax.plot(*zip(*pts), marker="o", label=f"{key[0]} @ {key[1]}")
    for target in sorted({r["target_l0"] for r in rows if r.get("target_l0")}):
        ax.axvline(target, linestyle=":", color="grey", linewidth=1)
    ax.set(xscale="log", xlabel="L0 (active latents per token)", ylabel="FVU", title="SAE sweep: L0 vs FVU")
    ax.grid(True, alpha=0.3)
    if rows:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def log_summary(client, run_id: str, rows: list[dict], producer_stats: list[dict], model_name: str,
                register_models: bool) -> None:
    """Into the parent run: summary.txt, summary.json, frontier.png, buffer figures; then, on each
    registered model the sweep trained into (one per hook), the `best-fvu` and `l0-N-best`
    aliases for its best ok versions, this sweep's and earlier ones', and its description."""
    with tempfile.TemporaryDirectory() as tmp:
        plot_frontier(rows, Path(tmp, "frontier.png"))
        Path(tmp, "summary.txt").write_text(format_table(rows) + "\n")
        Path(tmp, "summary.json").write_text(json.dumps({"trials": rows, "producers": producer_stats}, indent=2, default=str))
        client.log_artifacts(run_id, tmp)
    if producer_stats:
        tracking.log_metrics(client, run_id, {
            "buffer_rows": sum(s["rows"] for s in producer_stats),
            "producer_tokens_per_s": sum(s["tokens_per_s"] for s in producer_stats),
        }, 0)
    if register_models:
        from sae_ray.tracking.registry import refresh_model

        for hook in sorted({row["hook"] for row in rows if row["version"]}):
            refresh_model(client, tracking.registry_name(model_name, hook), model=model_name)
