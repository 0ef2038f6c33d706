"""Every axis of every plot has readable tick labels, log axes over any range included."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pytest
from matplotlib.axis import Axis
from matplotlib.figure import Figure

from seqedit.pipeline.cli.commands import (
    HEALTH_PER_EDIT_SQL,
    HEALTH_PERIODIC_SQL,
    curve_sql,
    trend_rows,
)
from seqedit.pipeline.results.plot_data import layer_drift, update_norms
from seqedit.pipeline.results.plots import (
    degradation_figure,
    health_figure,
    log_ticks,
    norm_growth_figure,
)
from seqedit.pipeline.results.plots_compare import CompareRun, compare_figure
from seqedit.pipeline.results.views import query

COMPARE_CURVES_SQL = "SELECT * FROM curves WHERE protocol <> 'immediate' ORDER BY n_edits_applied"


def shown_labels(axis: Axis) -> list[str]:
    """The non-empty tick labels `axis` shows (major and minor ones, inside its view)."""
    low, high = sorted(axis.get_view_interval())
    slack = (high - low) * 1e-9
    ticks = [*axis.get_major_ticks(), *axis.get_minor_ticks()]
    return [
        tick.label1.get_text()
        for tick in ticks
        if tick.label1.get_visible()
        and low - slack <= tick.get_loc() <= high + slack
        and tick.label1.get_text().strip()
    ]


def assert_readable(fig: Figure) -> None:
    """At least two labelled ticks on every axis; an x axis shared with the panel below
    it may leave its labels to that panel."""
    fig.canvas.draw()
    for ax in fig.axes:
        name = ax.get_title() or fig.get_suptitle()
        assert len(shown_labels(ax.yaxis)) >= 2, (name, ax.get_yscale(), ax.get_ylim())
        siblings = ax.get_shared_x_axes().get_siblings(ax)
        x_labels = [len(shown_labels(other.xaxis)) for other in siblings]
        assert max(x_labels) >= 2, (name, ax.get_xlim())


def test_every_plot_of_a_small_campaign(small_campaign: Path) -> None:
    c = small_campaign
    per_edit, window = trend_rows(c)
    periodic = query(c, HEALTH_PERIODIC_SQL)
    norms = (update_norms(c), layer_drift(c))
    figures = [
        degradation_figure(query(c, curve_sql()), per_edit, periodic, title="d", window=window),
        health_figure(query(c, HEALTH_PER_EDIT_SQL.format(window=49)), periodic, title="h"),
        norm_growth_figure({"c": norms}, title="n"),
        norm_growth_figure({"a": norms, "b": norms}, title="n2"),
    ]
    run = CompareRun(query(c, COMPARE_CURVES_SQL), per_edit, window, periodic)
    figures.append(compare_figure({"a": run, "b": run}))
    for fig in figures:
        assert_readable(fig)


def test_every_plot_of_a_single_edit() -> None:
    """One point per series: the autoscaled ranges are at their narrowest."""
    per_edit = pa.table({"n": [1], "success_rate": [1.0], "median_p_new": [0.9]})
    periodic = pa.table({"n": [1], "retention": [1.0], "weight_drift": [0.01]})
    curve = pa.table({"n_edits_applied": [1], "es": [1.0], "ps": [0.5], "ns": [0.5]})
    norms = pa.table({"n": [1], "update_norm": [2.0], "rolled_back": [False],
                      "rolling_median": [2.0]})  # fmt: skip
    drift = pa.table({"layer": ["m"], "n": [1], "drift": [0.01]})
    assert_readable(degradation_figure(curve, per_edit, periodic, title="d"))
    assert_readable(health_figure(per_edit, periodic, title="h"))
    assert_readable(norm_growth_figure({"c": (norms, drift)}, title="n"))
    scores = pa.table({"n_edits_applied": [1], "es": [1.0], "ps": [0.5], "ns": [0.5],
                       "score": [0.6]})  # fmt: skip
    assert_readable(compare_figure({"c": CompareRun(scores, per_edit, 50, periodic)}))


@pytest.mark.parametrize(
    ("low", "high"),
    [(0.62, 0.68), (0.55, 0.95), (0.2, 0.9), (2.1e-3, 2.9e-3), (4.0e-3, 4.5e-3),
     (1e-3, 5e-3), (3e-5, 0.9), (1e-12, 1.0), (1e-30, 1.0), (0.03, 0.03), (5.0, 5000.0)],
)  # fmt: skip
def test_log_axes_are_labelled_over_any_range(low: float, high: float) -> None:
    """The demo's health plot: P(target_new) and weight drift within less than a decade
    had no labelled tick at all."""
    n = list(range(1, 41))
    values = [low + (high - low) * i / 39 for i in range(40)]
    per_edit = pa.table({"n": n, "success_rate": [1.0] * 40, "median_p_new": values})
    periodic = pa.table({"n": n[::4], "retention": [1.0] * 10, "weight_drift": values[::4]})
    fig = health_figure(per_edit, periodic, title="narrow")
    assert_readable(fig)
    drift = fig.axes[3]
    assert drift.get_yscale() == "log" and len(shown_labels(drift.yaxis)) <= 12


@pytest.mark.parametrize(
    ("low", "high", "expected"),
    [(0.5, 0.95, [0.5, 0.6, 0.7, 0.8, 0.9]), (1e-4, 1.0, [1e-4, 1e-3, 1e-2, 0.1, 1.0]),
     (0.015, 0.25, [0.02, 0.05, 0.1, 0.2]), (0.62, 0.68, [0.62, 0.64, 0.66, 0.68])],
)  # fmt: skip
def test_log_ticks(low: float, high: float, expected: list[float]) -> None:
    assert log_ticks(low, high) == pytest.approx(expected)
    many = log_ticks(1e-30, 1.0)
    assert 3 <= len(many) <= 11 and many[-1] == 1.0
