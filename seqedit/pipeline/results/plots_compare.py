"""The plot comparing campaigns: degradation over the run and CounterFact scores."""

from __future__ import annotations

from typing import NamedTuple

import pyarrow as pa
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from seqedit.pipeline.results.plots import (
    columns_of,
    log_y,
    marker_for,
    plot_sampled,
    plt,
    save,
    xy,
)
from seqedit.storage import Location, Where


class CompareRun(NamedTuple):
    """The rows of one campaign that plot_compare draws."""

    curves: pa.Table
    """The `curves` view: `n_edits_applied`, `es`, `ps`, `ns`, `score`."""
    per_edit: pa.Table
    """`n`, `success_rate`, `median_p_new` (commands.trend_rows)."""
    window: int
    """Edits in the rolling window of `per_edit`."""
    periodic: pa.Table
    """`n`, `retention`, ... (commands.HEALTH_PERIODIC_SQL)."""


TREND_PANELS = (
    ("per_edit", "success_rate", "Immediate efficacy (right after each edit, rolling {window})",
     "fraction verified (0–1)"),
    ("periodic", "retention", "Retention of earlier edits (periodic re-test of a sample)",
     "fraction still held (0–1)"),
    ("per_edit", "median_p_new", "Median P(target_new) right after the edit (rolling {window})",
     "probability (log)"),
)  # fmt: skip
"""Panels over the whole run: table of CompareRun, column, title ({window}: the rolling
window in edits), y label."""

SCORES = {"es": "ES", "ps": "PS", "ns": "NS", "score": "score"}


def plot_compare(runs: dict[str, CompareRun], out: Where) -> Location:
    """Write compare_figure to `out` (see `plots.save`)."""
    return save(compare_figure(runs), out)


def compare_figure(runs: dict[str, CompareRun]) -> Figure:
    """Four panels against edits applied, one colour per campaign: immediate efficacy,
    retention, median P(new) after the edit, and the CounterFact scores (lines through the
    evaluation points, or bars when every campaign has a single one)."""
    fig, axes = plt.subplots(2, 2, figsize=(12, 7.5), dpi=110)
    windows = {run.window for run in runs.values()}
    window = f"{windows.pop()} edits" if len(windows) == 1 else "1/20 of each run"
    for ax, (table, column, title, ylabel) in zip(axes.flat, TREND_PANELS, strict=False):
        values: list[float] = []
        for i, (name, run) in enumerate(runs.items()):
            points = columns_of(getattr(run, table)).get(column)
            if points and table == "periodic":
                plot_sampled(ax, points, color=f"C{i}", label=name)
            elif points:
                ax.plot(*xy(points), color=f"C{i}", linewidth=1.1, marker=marker_for(points),
                        markersize=3, label=name)  # fmt: skip
            values += [v for _, v in points or []]
        if column == "median_p_new" and values:
            log_y(ax)
        elif column != "median_p_new":
            ax.set_ylim(-0.02, 1.02)
        _finish(ax, title.format(window=window), ylabel, drawn=bool(values))
    _scores_panel(axes[1, 1], {name: run.curves for name, run in runs.items()})
    fig.suptitle("campaigns compared: degradation against edits applied")
    return fig


def _scores_panel(ax: Axes, curves: dict[str, pa.Table]) -> None:
    """ES/PS/NS/score of each campaign: grouped bars at its only evaluation point, or the
    ES (solid) and score (dashed) lines through its evaluation points."""
    tables = {name: t.to_pydict() for name, t in curves.items()}
    if all(len(t["n_edits_applied"]) <= 1 for t in tables.values()):
        width = 0.8 / max(len(tables), 1)
        for i, (name, t) in enumerate(tables.items()):
            if not t["n_edits_applied"]:
                continue
            xs = [k + (i - (len(tables) - 1) / 2) * width for k in range(len(SCORES))]
            heights = [t[m][0] or 0.0 for m in SCORES]
            bars = ax.bar(xs, heights, width, color=f"C{i}",
                          label=f"{name} (after {t['n_edits_applied'][0]:,} edits)")  # fmt: skip
            ax.bar_label(bars, fmt="%.2f", fontsize=8)
        ax.set_xticks(range(len(SCORES)), list(SCORES.values()))
        ax.set_ylim(0, 1.1)
        _finish(ax, "CounterFact scores at the evaluation", "fraction (0–1)", drawn=True,
                xlabel="metric")  # fmt: skip
        return
    for i, (name, t) in enumerate(tables.items()):
        for metric, style in (("es", "-"), ("score", "--")):
            points = [(n, v) for n, v in zip(t["n_edits_applied"], t[metric], strict=True)
                      if v is not None]  # fmt: skip
            if points:
                ax.plot(*xy(points), color=f"C{i}", linestyle=style, marker="o", markersize=3,
                        label=f"{name}: {SCORES[metric]}")  # fmt: skip
    ax.set_ylim(-0.02, 1.02)
    _finish(ax, "CounterFact ES and score at evaluation points", "fraction (0–1)", drawn=True)


def _finish(ax: Axes, title: str, ylabel: str, *, drawn: bool, xlabel: str = "") -> None:
    """Title, labels, grid and legend of one panel ("not measured" when nothing drawn)."""
    ax.set_title(title, fontsize=10)
    ax.set_ylabel(ylabel, fontsize=9)
    ax.grid(True, alpha=0.3)
    if xlabel:
        ax.set_xlabel(xlabel)
    else:
        ax.set_xlabel("edits applied (count)")
        ax.set_xlim(left=0)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if drawn:
        ax.legend(fontsize=8, loc="best", framealpha=0.85)
    else:
        ax.text(0.5, 0.5, "not measured", ha="center", va="center", transform=ax.transAxes)
