"""Degradation-curve, health and norm-growth plots of one campaign (matplotlib, headless)."""

from __future__ import annotations

import math

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import pyarrow as pa
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, Locator, MaxNLocator, NullFormatter

from seqedit.pipeline.results.plot_data import NORM_WINDOW
from seqedit.storage import Location, Where, location

Points = list[tuple[float, float]]

EVAL_METRICS = {
    "es": "Efficacy ES (all edits so far)",
    "ps": "Generalisation PS (all edits so far)",
    "ns": "Specificity NS (all edits so far)",
}
"""Evaluation-point columns of the degradation plot and their legend labels."""


def plot_degradation(
    curve: pa.Table,
    per_edit: pa.Table,
    periodic: pa.Table,
    out: Where,
    *,
    title: str,
    window: int = 50,
) -> Location:
    """Write degradation_figure to `out` (see `save`)."""
    return save(degradation_figure(curve, per_edit, periodic, title=title, window=window), out)


def degradation_figure(
    curve: pa.Table, per_edit: pa.Table, periodic: pa.Table, *, title: str, window: int = 50
) -> Figure:
    """Scores (0-1) against edits applied: the immediate efficacy of every edit, rolling
    over `window` edits (`per_edit`: `n`, `success_rate`), the periodic retention of
    earlier edits (`periodic`: `n`, `retention`) and ES/PS/NS at the evaluation points
    (`curve`: `n_edits_applied` and the columns of EVAL_METRICS), whose legend entries
    give the last value (a campaign evaluated once has one marker per metric, ES largest,
    so that equal values stay visible)."""
    fig, ax = plt.subplots(figsize=(9, 5.2), dpi=120)
    trends = {**columns_of(per_edit), **columns_of(periodic)}
    if immediate := trends.get("success_rate"):
        ax.plot(*xy(immediate), color="C0", linewidth=1, alpha=0.8, marker=marker_for(immediate),
                label=f"immediate efficacy (right after each edit, rolling {window})")  # fmt: skip
    if retention := trends.get("retention"):
        label = "retention (sample of earlier edits re-tested)"
        plot_sampled(ax, retention, color="C1", label=label)
    data = curve.to_pydict()
    for k, (column, label) in enumerate(EVAL_METRICS.items()):
        points = [(a, b) for a, b in zip(data["n_edits_applied"], data.get(column, []),
                                         strict=False) if b is not None]  # fmt: skip
        if points:
            n, last = points[-1]
            ax.plot(*xy(points), color=f"C{k + 2}", marker="osD"[k], linewidth=1.6, zorder=5,
                    markersize=12 - 3 * k if len(points) == 1 else 4, markeredgecolor="white",
                    label=f"{label}: {last:.2f} at {n:,}")  # fmt: skip
    ax.set_xlabel("edits applied (count)")
    ax.set_ylabel("score (fraction of prompts, 0–1)")
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlim(left=0)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(True, alpha=0.3)
    ax.set_title(title)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=2, fontsize=8.5)
    return fig


def plot_sampled(ax: Axes, points: Points, *, color: str, label: str) -> None:
    """A periodic, sampled series: a line with markers when short; when long, the raw
    line faint under its trailing mean over 1/20 of the points (less sampling noise)."""
    if len(points) <= 30:
        ax.plot(*xy(points), color=color, marker="o", markersize=3, linewidth=1.2, label=label)
        return
    k = len(points) // 20
    ax.plot(*xy(points), color=color, linewidth=0.8, alpha=0.3)
    means = [sum(v for _, v in points[max(0, i - k + 1) : i + 1]) / min(k, i + 1)
             for i in range(len(points))]  # fmt: skip
    ax.plot([n for n, _ in points], means, color=color, linewidth=1.8,
            label=f"{label}, mean of {k} checks")  # fmt: skip


HEALTH_PANELS = (
    ("Edits that hold", "fraction (0–1)", False,
     {"success_rate": "immediate success (rolling)", "retention": "retention of earlier edits",
      "locality_top1": "probe top-1 unchanged"}),
    ("Target probability right after the edit", "P(target_new) (log)", True,
     {"median_p_new": "median over the window (collapse: ~1e-5)"}),
    ("Damage outside the edits", "ratio / nats", False,
     {"perplexity_ratio": "held-out perplexity / base (ratio)",
      "locality_kl": "probe KL(base‖edited) (nats)"}),
    ("Weight drift", "‖W_t − W_0‖_F / ‖W_0‖_F (ratio, log)", True,
     {"weight_drift": "max over layers"}),
)  # fmt: skip
"""Panels of the health plot: title, y label, log scale, {column: legend label}."""


def plot_health(per_edit: pa.Table, periodic: pa.Table, out: Where, *, title: str) -> Location:
    """Write health_figure to `out` (see `save`)."""
    return save(health_figure(per_edit, periodic, title=title), out)


def health_figure(per_edit: pa.Table, periodic: pa.Table, *, title: str) -> Figure:
    """Four panels of health against the number of edits applied.

    `per_edit`: columns `n` (edits applied), `success_rate`, `median_p_new` (rolling over
    the kept edits). `periodic`: `n` and any of `retention`, `locality_top1`, `locality_kl`,
    `perplexity_ratio`, `weight_drift` (NULL where not measured).
    """
    series = {**columns_of(per_edit), **columns_of(periodic)}
    fig, axes = plt.subplots(2, 2, figsize=(11, 7), dpi=110, sharex=True)
    for ax, (panel, ylabel, log, columns) in zip(axes.flat, HEALTH_PANELS, strict=True):
        drawn = [(series[c], label) for c, label in columns.items() if series.get(c)]
        for points, label in drawn:
            ax.plot(*xy(points), label=label, marker=marker_for(points), markersize=3,
                    linewidth=1.2)  # fmt: skip
        if log and drawn:
            log_y(ax)
        ax.set_title(panel, fontsize=10)
        ax.set_ylabel(ylabel, fontsize=9)
        ax.grid(True, alpha=0.3)
        if drawn:
            ax.legend(fontsize=8, loc="best", framealpha=0.85)
        else:
            ax.text(0.5, 0.5, "not measured", ha="center", va="center", transform=ax.transAxes)
    for ax in axes[1]:
        ax.set_xlabel("edits applied (count)")
        ax.set_xlim(left=0)  # whole edits: one edit alone would get ticks at 0.95 .. 1.05
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.suptitle(title)
    return fig


def plot_norm_growth(
    runs: dict[str, tuple[pa.Table, pa.Table]], out: Where, *, title: str
) -> Location:
    """Write norm_growth_figure to `out` (see `save`)."""
    return save(norm_growth_figure(runs, title=title), out)


def norm_growth_figure(runs: dict[str, tuple[pa.Table, pa.Table]], *, title: str) -> Figure:
    """Two panels against edits applied: the update norm of each edit (faint points, log
    scale) with its rolling median, and the cumulative relative weight drift of each edited
    layer. `runs`: campaign -> (plot_data.update_norms, plot_data.layer_drift) tables. One
    campaign: a colour per layer; several: a colour per campaign, a line style per layer."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.8), dpi=110)
    several = len(runs) > 1
    norms_drawn: list[float] = []
    drifts_drawn: list[float] = []
    for i, (name, (norms, drift)) in enumerate(runs.items()):
        prefix = f"{name}: " if several else ""
        d = norms.to_pydict()
        rows = list(zip(d["n"], d["update_norm"], d["rolled_back"], strict=True))
        kept = [(n, v) for n, v, back in rows if not back and v > 0]
        faint = 0.5 if len(kept) < 200 else 0.15
        left.scatter(*xy(kept), s=4, color=f"C{i}", alpha=faint, linewidths=0,
                     label=f"{prefix}each applied edit")  # fmt: skip
        if back := [(n, v) for n, v, rolled in rows if rolled and v > 0]:
            left.scatter(*xy(back), s=16, marker="x", color=f"C{i}",
                         label=f"{prefix}rolled back (not applied)")  # fmt: skip
        median = [(n, m) for n, m in zip(d["n"], d["rolling_median"], strict=True) if m is not None]
        left.plot(*xy(median), color=f"C{i}", linewidth=2,
                  label=f"{prefix}rolling median ({NORM_WINDOW} edits)")  # fmt: skip
        norms_drawn += [v for _, v in kept + back]
        for j, (layer, points) in enumerate(_by_layer(drift).items()):
            right.plot(*xy(points), color=f"C{i}" if several else f"C{j}",
                       linestyle=("-", "--", ":", "-.")[j % 4] if several else "-",
                       marker=marker_for(points), markersize=3, label=prefix + layer)  # fmt: skip
            drifts_drawn += [v for _, v in points]
    if norms_drawn:
        log_y(left)
    left.set_title("Update norm of each edit", fontsize=10)
    left.set_ylabel("‖ΔW‖_F of the edit (weight units, log)", fontsize=9)
    right.set_title("Cumulative relative weight drift per edited layer", fontsize=10)
    drift_label = "‖W_t − W_0‖_F / ‖W_0‖_F (ratio)"
    if drifts_drawn and max(drifts_drawn) >= 10 * min(v for v in drifts_drawn if v > 0):
        log_y(right)
        drift_label = drift_label[:-1] + ", log)"
    right.set_ylabel(drift_label, fontsize=9)
    for ax in (left, right):
        ax.set_xlabel("edits applied (count)")
        ax.set_xlim(left=0)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.14), markerscale=2)
    fig.suptitle(title)
    return fig


def log_y(ax: Axes) -> None:
    """Log y axis whose ticks are labelled over any range it shows (`log_ticks`); the
    default one labels only powers of ten, none when the data span less than a decade."""
    ax.set_yscale("log")
    ax.yaxis.set_major_locator(LabelledLogLocator())
    ax.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    ax.yaxis.set_minor_formatter(NullFormatter())


class LabelledLogLocator(Locator):
    """The major ticks of a log axis: `log_ticks` of the range it shows."""

    def __call__(self) -> list[float]:
        return self.tick_values(*self.axis.get_view_interval())

    def tick_values(self, vmin: float, vmax: float) -> list[float]:
        return log_ticks(vmin, vmax)


def log_ticks(low: float, high: float) -> list[float]:
    """At least three ticks from `low` to `high` (> 0) for a log axis, the sparsest of: the
    powers of ten (thinned to at most ten, down from `high`'s), 1-2-5, 1-2-3-5 or 1..9
    times them; for a range too narrow for any (0.62 to 0.68), round values evenly spaced
    (0.62, 0.64, 0.66, 0.68), as a linear axis would have."""
    low, high = sorted((low, high))
    if high <= 0:
        return []
    low = low if low > 0 else high / 10
    slack = 1e-9 * (high - low)
    decades = range(math.floor(math.log10(low)), math.ceil(math.log10(high)) + 1)
    for subs in ((1,), (1, 2, 5), (1, 2, 3, 5), range(1, 10)):
        ticks = [float(f"{m}e{k}") for k in decades for m in subs]
        ticks = [t for t in ticks if low - slack <= t <= high + slack]
        if len(ticks) >= 3:
            stride = math.ceil(len(ticks) / 10)
            return ticks[::-1][::stride][::-1]
    linear = MaxNLocator(nbins=4).tick_values(low, high)
    return [float(t) for t in linear if low - slack <= t <= high + slack]


def _by_layer(drift: pa.Table) -> dict[str, Points]:
    """{layer: [(n, drift)]} of a layer_drift table, in its row order."""
    layers: dict[str, Points] = {}
    for row in drift.to_pylist():
        layers.setdefault(row["layer"], []).append((row["n"], row["drift"]))
    return layers


def marker_for(points: Points) -> str | None:
    """Markers on sparse series (periodic checks), a plain line on dense ones (per edit)."""
    return None if len(points) > 60 else "o"


def xy(points: Points) -> tuple[list[float], list[float]]:
    """The x and the y values of `points`."""
    return [p[0] for p in points], [p[1] for p in points]


def columns_of(table: pa.Table) -> dict[str, Points]:
    """{column: [(n, value)]} of the non-null values of every column but `n`."""
    data = table.to_pydict()
    x = data.pop("n", [])
    return {
        name: [(a, b) for a, b in zip(x, values, strict=True) if b is not None]
        for name, values in data.items()
    }


def save(fig: Figure, out: Where) -> Location:
    """Lay out, write (legends outside the axes included, the format named by the file's
    suffix) atomically to a local path or storage URI, and close `fig`; where it went."""
    fig.tight_layout()
    target = location(out)
    image_format = target.name.rsplit(".", 1)[-1] if "." in target.name else "png"
    try:
        return target.write_with(
            lambda tmp: fig.savefig(tmp, format=image_format, bbox_inches="tight")
        )
    finally:
        plt.close(fig)
