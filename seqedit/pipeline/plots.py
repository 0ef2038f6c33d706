"""Degradation-curve and health plots (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import pyarrow as pa
from matplotlib.figure import Figure
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
    return _save(fig, out)


HEALTH_PANELS = (
    ("Edits that hold", "fraction (0–1)", False,
     {"success_rate": "immediate success (rolling)", "retention": "retention of earlier edits",
      "locality_top1": "probe top-1 unchanged"}),
    ("Target probability right after the edit", "P(target_new) (log)", True,
     {"median_p_new": "median over the window (collapse: ~1e-5)"}),
    ("Damage outside the edits", "ratio / nats", False,
     {"perplexity_ratio": "held-out perplexity / base", "locality_kl": "probe KL(base‖edited)"}),
    ("Weight drift", "‖W_t − W_0‖ / ‖W_0‖ (log)", True, {"weight_drift": "max over layers"}),
)  # fmt: skip
"""Panels of the health plot: title, y label, log scale, {column: legend label}."""


def plot_health(per_edit: pa.Table, periodic: pa.Table, out: str | Path, *, title: str) -> Path:
    """Four panels of health against the number of edits applied.

    `per_edit`: columns `n` (edits applied), `success_rate`, `median_p_new` (rolling over
    the kept edits). `periodic`: `n` and any of `retention`, `locality_top1`, `locality_kl`,
    `perplexity_ratio`, `weight_drift` (NULL where not measured).
    """
    series = {**_columns(per_edit), **_columns(periodic)}
    fig, axes = plt.subplots(2, 2, figsize=(11, 7), dpi=110, sharex=True)
    for ax, (panel, ylabel, log, columns) in zip(axes.flat, HEALTH_PANELS, strict=True):
        drawn = 0
        for column, label in columns.items():
            points = series.get(column, [])
            if not points:
                continue
            dense = len(points) > 60  # per-edit series: a line; periodic checks: markers
            ax.plot([p[0] for p in points], [p[1] for p in points], label=label,
                    marker=None if dense else "o", markersize=3, linewidth=1.2)  # fmt: skip
            drawn += 1
        if log and drawn:
            ax.set_yscale("log")
        ax.set_title(panel, fontsize=10)
        ax.set_ylabel(ylabel, fontsize=9)
        ax.grid(True, alpha=0.3)
        if drawn:
            ax.legend(fontsize=8, loc="best")
        else:
            ax.text(0.5, 0.5, "not measured", ha="center", va="center", transform=ax.transAxes)
    for ax in axes[1]:
        ax.set_xlabel("edits applied (count)")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.suptitle(title)
    return _save(fig, out)


def _columns(table: pa.Table) -> dict[str, list[tuple[float, float]]]:
    """{column: [(n, value)]} of the non-null values of every column but `n`."""
    data = table.to_pydict()
    x = data.pop("n", [])
    return {
        name: [(a, b) for a, b in zip(x, values, strict=True) if b is not None]
        for name, values in data.items()
    }


def _save(fig: Figure, out: str | Path) -> Path:
    """Lay out, write and close `fig`; the path written."""
    fig.tight_layout()
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


COMPARE_PANELS = {"es": "Efficacy ES", "ps": "Generalisation PS", "ns": "Specificity NS",
                  "score": "Score (harmonic mean)"}  # fmt: skip


def plot_compare(curves: dict[str, pa.Table], out: str | Path) -> Path:
    """One panel per metric of COMPARE_PANELS against edits applied, one line per campaign.

    `curves`: campaign name -> rows of the `curves` view (`n_edits_applied`, the metrics).
    """
    fig, axes = plt.subplots(2, 2, figsize=(11, 7), dpi=110, sharex=True)
    for ax, (metric, label) in zip(axes.flat, COMPARE_PANELS.items(), strict=True):
        for name, table in curves.items():
            data = table.to_pydict()
            points = [(n, v) for n, v in zip(data["n_edits_applied"], data[metric], strict=True)
                      if v is not None]  # fmt: skip
            if points:
                ax.plot([p[0] for p in points], [p[1] for p in points], marker="o",
                        markersize=3, linewidth=1.4, label=name)  # fmt: skip
        ax.set_title(label, fontsize=10)
        ax.set_ylabel("fraction (0–1)", fontsize=9)
        ax.set_ylim(-0.02, 1.02)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8, loc="best")
    for ax in axes[1]:
        ax.set_xlabel("edits applied (count)")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.suptitle("campaigns compared: CounterFact scores against edits applied")
    return _save(fig, out)
