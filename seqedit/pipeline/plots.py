"""Degradation-curve plots (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import pyarrow as pa
from matplotlib.ticker import MaxNLocator

CURVE_METRICS = {
    "es": "Efficacy ES (all edits so far)",
    "ps": "Generalisation PS (all edits so far)",
    "ns": "Specificity NS (all edits so far)",
    "immediate_es": "Immediate efficacy (right after each edit, rolling)",
}


def plot_degradation(curve: pa.Table, out: str | Path, *, title: str) -> Path:
    """Plot metrics (0-1) against the number of edits applied; one line per metric column.

    `curve` has a column `n_edits_applied` and any of the columns in CURVE_METRICS.
    """
    data = curve.to_pydict()
    x = data["n_edits_applied"]
    fig, ax = plt.subplots(figsize=(7.5, 4.5), dpi=120)
    markers = iter("osD^v")
    for column, label in CURVE_METRICS.items():
        if column in data and any(v is not None for v in data[column]):
            points = [(a, b) for a, b in zip(x, data[column], strict=True) if b is not None]
            ax.plot(
                [p[0] for p in points],
                [p[1] for p in points],
                marker=next(markers),
                markersize=4,
                linewidth=1.6,
                label=label,
            )
    ax.set_xlabel("edits applied (count)")
    ax.set_ylabel("score (fraction of prompts, 0–1)")
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlim(left=0)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(True, alpha=0.3)
    ax.set_title(title)
    ax.legend(loc="lower left", frameon=True)
    fig.tight_layout()
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
