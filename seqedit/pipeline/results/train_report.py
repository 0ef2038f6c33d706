"""`seqedit report` of a training directory (`seqedit train`): its learning curves and a
summary, from the `train_curves` view (`train_views`), as one HTML page with its PNG."""

from __future__ import annotations

import html
import json
import math

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import pyarrow as pa
from matplotlib.figure import Figure

from seqedit.pipeline.results.plots import save
from seqedit.pipeline.results.views import query
from seqedit.storage import Location

PANELS = (
    ("loss_total", "total loss (c_edit·NLL + c_loc·KL)", ("train", "val")),
    ("edit_acc", "edit accuracy on the rephrase", ("train", "val")),
    ("loss_loc", "locality loss KL(pre ‖ post)", ("train", "val")),
    ("perplexity_post", "perplexity of the edit target after the edit", ("train", "val")),
)
"""(column of train_curves, panel title, splits drawn)."""


def training_figure(curves: pa.Table, *, title: str, best_step: int | None) -> Figure:
    """Four panels of train and validation curves against the step; the best checkpoint's
    step as a dashed line."""
    figure, axes = plt.subplots(2, 2, figsize=(11, 7), sharex=True)
    rows = curves.to_pylist()
    for axis, (column, label, splits) in zip(axes.flat, PANELS, strict=True):
        for split in splits:
            points = [(r["step"], r[column]) for r in rows
                      if r["split"] == split and r[column] is not None
                      and not math.isnan(r[column])]  # fmt: skip
            if points:
                steps, values = zip(*points, strict=True)
                style = {"marker": "o", "markersize": 3} if split == "val" else {"alpha": 0.5}
                axis.plot(steps, values, label=split, **style)
        if best_step is not None:
            axis.axvline(best_step, color="grey", linestyle="--", label=f"best (step {best_step})")
        axis.set_title(label, fontsize=10)
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    for axis in axes[1]:
        axis.set_xlabel("training step")
    figure.suptitle(title)
    figure.tight_layout()
    return figure


def _read_json(path: Location) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def write_train_report(root: Location, folder: Location) -> Location:
    """`folder/index.html` and `folder/training.png` of the training directory `root`."""
    folder.mkdir()
    curves = query(root, "SELECT * FROM train_curves")
    best = _read_json(root / "best" / "provenance.json")
    job = _read_json(root / "job.json")
    steps = query(root, "SELECT max(step) AS s FROM train").to_pylist()[0]["s"]
    max_steps = job.get("config", {}).get("max_steps")
    title = f"seqedit training: {job.get('method', 'mend')} on {job.get('model', root.name)}"
    image = save(training_figure(curves, title=title, best_step=best.get("step")),
                 folder / "training.png")  # fmt: skip
    last_val = query(root, "SELECT * FROM train_curves WHERE split = 'val' ORDER BY step "
                           "DESC LIMIT 1").to_pylist()  # fmt: skip
    facts = {
        "steps": steps,
        "max steps": max_steps,
        "workers": query(root, "SELECT max(workers) AS w FROM train").to_pylist()[0]["w"],
        "best step": best.get("step"),
        f"best {best.get('metric', 'metric')}": best.get("value"),
        "stopped early": None if steps is None or max_steps is None else steps < max_steps,
        "seconds": query(root, "SELECT max(seconds) AS s FROM train").to_pylist()[0]["s"],
    }
    if last_val:
        facts.update({f"last val {k}": v for k, v in last_val[0].items()
                      if k not in ("split", "step", "seconds", "workers")})  # fmt: skip
    table = "".join(
        f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(_cell(v))}</td></tr>"
        for k, v in facts.items()
    )
    page = (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}img{max-width:100%}"
        f"</style></head><body><h1>{html.escape(title)}</h1><table>{table}</table>"
        f'<figure><img src="{image.name}" alt="learning curves"><figcaption>train and '
        f"validation curves ({image.name})</figcaption></figure>"
        '<p>Query the rows: seqedit query DIR "SELECT * FROM train_curves".</p>'
        "</body></html>\n"
    )
    return (folder / "index.html").write_text(page)


def _cell(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)
