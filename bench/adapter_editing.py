"""LoRA and DPO beside FT-L, FT-M, ROME, MEMIT and AlphaEdit: 100 sequential edits on the
synthetic-300 testbed or on a CounterFact testbed, ES/PS/NS right after each edit and after
all of them; LoRA's locality against FT-L's as their learning rate moves reliability; and
what DPO's preference term does as its weight 1 - alpha grows.

    .venv/bin/python bench/adapter_editing.py --testbed synthetic [--parts table,frontier,alpha]
    .venv/bin/python bench/adapter_editing.py --testbed counterfact \\
        --model runs/cf-dev-testbed --stats runs/cf-dev-stats

The synthetic testbed is `make demo`'s (built under --out when missing) with each method's
`testbed_hparams`. The CounterFact testbed is a `seqedit testbed build --dataset ... --limit
300` directory with covariance of layers 0-3 (`seqedit stats build`); its hparams are those
of the example specs (ROME: testbed-counterfact-rome.yaml; MEMIT, AlphaEdit, FT-M:
counterfact-10k-*.yaml, applied here one edit at a time; FT-L: FT-M's; LoRA, DPO:
testbed-counterfact-{lora,dpo}.yaml). Prints one table per part and writes the frontier
plot to OUT/frontier-TESTBED.png.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import matplotlib
import pyarrow as pa
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from sequential_efficacy import HPARAMS, _testbed, run_method

from seqedit.pipeline.results.tables_format import format_table

matplotlib.use("Agg")
import matplotlib.pyplot as plt

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("lora", "dpo", "ft-l", "ft-m", "rome", "memit", "alphaedit")
EXAMPLE_SPECS = {
    "rome": "testbed-counterfact-rome.yaml",
    "memit": "counterfact-10k-memit.yaml",
    "alphaedit": "counterfact-10k-alphaedit.yaml",
    "ft-m": "counterfact-10k-ft-m.yaml",
    "ft-l": "counterfact-10k-ft-m.yaml",
    "lora": "testbed-counterfact-lora.yaml",
    "dpo": "testbed-counterfact-dpo.yaml",
}
LEARNING_RATES = {"lora": (5e-4, 1e-3, 2e-3, 5e-3), "ft-l": (0.02, 0.1, 0.5, 5.0)}
"""The learning rates of the frontier: Adam's for LoRA, SGD's for FT-L (its tuned optimiser)."""
ALPHAS = (1.0, 0.99, 0.9, 0.5, 0.0)


def counterfact_hparams() -> dict[str, dict[str, Any]]:
    """Method -> the hparams of its CounterFact example spec."""
    hparams = {}
    for method, name in EXAMPLE_SPECS.items():
        spec = yaml.safe_load((ROOT / "examples" / name).read_text())
        hparams[method] = dict(spec["hparams"])
    return hparams


def table(rows: list[dict[str, Any]], title: str) -> None:
    print(f"\n{title}\n{format_table(pa.Table.from_pylist(rows))}", flush=True)


_DONE: dict[str, dict] = {}
"""Runs already made in this process, by method and hparams (the parts share some)."""


def run(model: Path, stats: Path, method: str, hparams: dict[str, Any], n: int) -> dict:
    key = json.dumps([method, hparams, n], sort_keys=True)
    if key not in _DONE:
        _DONE[key] = run_method(model, stats, method, hparams, n, immediate=True)
        print(json.dumps({**_DONE[key], "hparams": hparams}), flush=True)
    return _DONE[key]


def frontier(
    model: Path, stats: Path, hparams: dict[str, dict[str, Any]], n: int, out: Path
) -> list[dict[str, Any]]:
    """Final ES and NS of LoRA and FT-L over their learning rates (saved as OUT.json, and
    plotted to OUT.png)."""
    rows = []
    for method, rates in LEARNING_RATES.items():
        for lr in rates:
            row = run(model, stats, method, {**hparams[method], "lr": lr}, n)
            scores = ("es", "ps", "ns", "immediate_ps", "immediate_ns")
            rows.append({"method": method, "lr": lr, **{k: row[k] for k in scores}})
    out.with_suffix(".json").write_text(json.dumps(rows, indent=1) + "\n")
    plot_frontier(rows, n, out)
    return rows


def plot_frontier(rows: list[dict[str, Any]], n: int, out: Path) -> None:
    """ES against NS after `n` edits, one marker per learning rate, labelled."""
    fig, ax = plt.subplots(figsize=(6.4, 4.6))
    for method, marker in (("lora", "o"), ("ft-l", "s")):
        points = [r for r in rows if r["method"] == method]
        ax.scatter([r["es"] for r in points], [r["ns"] for r in points], marker=marker, s=40,
                   label=f"{method} (label: learning rate)")  # fmt: skip
        for i, r in enumerate(points):
            ax.annotate(f"{r['lr']:g}", (r["es"], r["ns"]), textcoords="offset points",
                        xytext=(5, 5 if i % 2 else -10), fontsize=8)  # fmt: skip
    testbed = "CounterFact" if "counterfact" in out.stem else "synthetic-300"
    ax.set_xlabel(f"efficacy ES after {n} sequential edits")
    ax.set_ylabel(f"neighbourhood NS after {n} edits (locality)")
    ax.set_title(f"LoRA and FT-L on the {testbed} testbed: higher and further right is better")
    ax.title.set_fontsize(10)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    print(f"frontier plot -> {out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--testbed", choices=["synthetic", "counterfact"], default="synthetic")
    parser.add_argument("--model", type=Path, help="the CounterFact testbed directory")
    parser.add_argument("--stats", type=Path, help="its covariance (layers 0-3)")
    parser.add_argument("--parts", default="table,frontier,alpha")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--edits", type=int, default=100)
    parser.add_argument("--out", type=Path, default=Path("runs/bench-adapters"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.testbed == "synthetic":
        model, stats = _testbed(args.out)
        hparams = {name: dict(fields) for name, fields in HPARAMS.items()}
    else:
        if args.model is None or args.stats is None:
            raise SystemExit("--testbed counterfact needs --model and --stats")
        model, stats, hparams = args.model, args.stats, counterfact_hparams()
    parts, n = args.parts.split(","), args.edits
    if "table" in parts:
        rows = [run(model, stats, m, hparams[m], n) for m in args.methods.split(",")]
        table(rows, f"{n} sequential edits, {args.testbed} testbed")
    if "frontier" in parts:
        png = args.out / f"frontier-{args.testbed}.png"
        table(frontier(model, stats, hparams, n, png), "LoRA and FT-L over the learning rate")
    if "alpha" in parts:
        rows = []
        for alpha in ALPHAS:
            row = run(model, stats, "dpo", {**hparams["dpo"], "alpha": alpha}, n)
            rows.append({"alpha": alpha, **{k: row[k] for k in ("es", "ps", "ns")},
                         "immediate_es": row["immediate_es"]})  # fmt: skip
        table(rows, "DPO over alpha (1 = plain SFT through the same adapter)")


if __name__ == "__main__":
    main()
