"""The causal-tracing figure: average indirect effects per token row and layer (headless).

Three heatmaps side by side, as in ROME's Figure 2: restoring the hidden state (block
output), the MLP outputs and the attention outputs. Rows are the six token positions of
`methods.trace_rows.ROW_LABELS`, columns the layers (for MLP/attention, the centre of the
restored window). One colour scale for all three, so the panels compare; the best layer
of each kind at the last subject token and at the last token is outlined.
"""

from __future__ import annotations

import math

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.axes import Axes
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from seqedit.methods.trace_rows import KINDS, LAST_SUBJECT_ROW, LAST_TOKEN_ROW, TraceResult
from seqedit.pipeline.results.plots import save
from seqedit.storage import Location, Where

COLORMAPS = {"hidden": "Purples", "mlp": "Greens", "attn": "Reds"}
"""The reference's colours: hidden state purple, MLP green, attention red."""

COLORBAR_LABEL = "average indirect effect on P(target)"
OUTLINE = "#00b7eb"  # cyan: visible on purple, green and red


def plot_trace(result: TraceResult, out: Where) -> Location:
    """Write `trace_figure(result)` to `out` (a PNG path or storage URI; see `plots.save`)."""
    return save(trace_figure(result), out)


def aie_matrix(result: TraceResult, kind: str) -> np.ndarray:
    """(6, n_layer) AIEs of `kind`; NaN for a row no traced fact has."""
    rows = [row if row is not None else [math.nan] * result.n_layer for row in result.aie[kind]]
    return np.asarray(rows, dtype=float)


def trace_figure(result: TraceResult) -> Figure:
    """Three heatmaps (hidden, MLP, attention) of `result.aie` with one shared colorbar."""
    matrices = {kind: aie_matrix(result, kind) for kind in KINDS}
    finite = np.concatenate([m[np.isfinite(m)] for m in matrices.values()])
    low = min(0.0, float(finite.min())) if finite.size else 0.0
    high = float(finite.max()) if finite.size and finite.max() > low else low + 1e-6
    width = 3 * max(3.0, 1.2 + 0.32 * result.n_layer) + 2.6
    fig, axes = plt.subplots(
        1, 4, figsize=(width, 3.6), dpi=120,
        gridspec_kw={"width_ratios": [1, 1, 1, 0.06]},
    )  # fmt: skip
    for index, (ax, kind) in enumerate(zip(axes[:3], KINDS, strict=True)):
        _panel(ax, result, kind, matrices[kind], low, high, labels=index == 0)
    scale = ScalarMappable(Normalize(low, high), cmap="Greys")  # the shared scale, neutral
    colorbar = fig.colorbar(scale, cax=axes[3])
    colorbar.set_label(COLORBAR_LABEL)
    fig.suptitle(
        f"Causal tracing of {result.model}: {result.n_traced} facts "
        f"(mean P(target) clean {result.p_clean:.3f}, subject corrupted {result.p_corrupt:.3f})"
    )
    fig.supxlabel(
        "outlined: the layer of largest effect at the last subject token and at the last token",
        fontsize=8,
        color="#555555",
    )
    return fig


def _panel(
    ax: Axes,
    result: TraceResult,
    kind: str,
    matrix: np.ndarray,
    low: float,
    high: float,
    *,
    labels: bool,
) -> None:
    cmap = plt.get_cmap(COLORMAPS[kind]).with_extremes(bad="#dddddd")  # a row no fact has
    ax.imshow(
        np.ma.masked_invalid(matrix), cmap=cmap, vmin=low, vmax=high, aspect="auto",
        interpolation="nearest",
    )  # fmt: skip
    step = max(1, math.ceil(result.n_layer / 12))
    ax.set_xticks(range(0, result.n_layer, step))
    ax.set_yticks(range(len(result.row_labels)))
    ax.set_yticklabels(result.row_labels if labels else [])
    if kind == "hidden":
        ax.set_title("restored hidden state (block output)")
        ax.set_xlabel("layer")
    else:
        name = "MLP" if kind == "mlp" else "attention"
        ax.set_title(f"restored {name} outputs")
        ax.set_xlabel(
            "layer" if result.window == 1 else f"layer (centre of {result.window} restored)"
        )
    best = result.best_layers[kind]
    for row, layer in ((LAST_SUBJECT_ROW, best.last_subject), (LAST_TOKEN_ROW, best.last_token)):
        ax.add_patch(
            Rectangle((layer - 0.5, row - 0.5), 1, 1, fill=False, edgecolor=OUTLINE, linewidth=2)
        )
