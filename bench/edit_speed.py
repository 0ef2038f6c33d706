"""Edits per second of every method on the golden tiny GPT-2, against a baseline in the same run.

    .venv/bin/python bench/edit_speed.py [--golden DIR] [--repeats 3] [--threads 2]

For each method, three configurations edit the golden set's 20 requests with the real
`SequentialEditor` (ROME, AlphaEdit, FT-L, FT-M one after another; MEMIT as one batch of
20, like the reference run):
  baseline  early stopping off (the value/z optimisation always runs its full budget),
            caching off: C^-1 / the null-space basis computed afresh (setup is timed) and
            the blocks below the edit recomputed at every step (`reuse_lower_layers` off);
  exact     the reference's early stop (loss < 5e-2), the derived-tensor cache and
            `reuse_lower_layers`: the same edits as the reference semantics;
  top1      exact plus `early_stop_top1` (stop once the target is top-1 everywhere).
FT has no value optimisation, covariance or lower layers to reuse: its rows show the
early stop only.
Setup (model load excluded) and edits are timed; each configuration runs `--repeats` times
from the base model and the median is reported. Results are printed next to the timings
(edit success, mean P(new) after each edit, final ES over the 20 after the last edit) so
speed is compared at equal results. The reference implementation's own medians from the
golden set's summary.json are printed for context (same kind of machine, different run);
bench/edit_speed_reference.py runs the reference side by side with ours instead.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from seqedit.pipeline.cli.hparams_import import import_hparams
from seqedit.workers.editor import SequentialEditor
from seqedit.workers.stats import StatsConfig, compute_stats
from seqedit.workers.stats_store import save_stats
from tests.golden import GoldenSet, golden_dir

FT = {"layer": 2, "lr": 5e-3, "num_steps": 20, "early_stop_loss": 1e-2}
BASELINE = {"early_stop_loss": 0.0, "early_stop_top1": False, "reuse_lower_layers": False}


def _hparams(golden: GoldenSet, method: str) -> dict[str, Any]:
    """The golden run's hparams in our format, with its pinned context templates."""
    if method.startswith("ft-"):
        return dict(FT)
    imported = import_hparams(golden.root / f"hparams_{method}.json", method=method)
    return {**imported.hparams, "context_templates": golden.context_templates(method)}


def _variants(method: str, base: dict[str, Any]) -> dict[str, dict[str, Any]]:
    if method.startswith("ft-"):
        return {"baseline": {**base, "early_stop_loss": None}, "exact": base}
    return {
        "baseline": {**base, **BASELINE},
        "exact": base,
        "top1": {**base, "early_stop_top1": True},
    }


def run_once(
    golden: GoldenSet, stats: Path, method: str, hparams: dict[str, Any], *, cached: bool
) -> dict[str, Any]:
    """Setup + 20 edits from the base model; timings and results."""
    if not cached:
        shutil.rmtree(stats / "derived", ignore_errors=True)
    requests = golden.requests()
    started = time.perf_counter()
    editor = SequentialEditor(
        str(golden.root / "model"), method, hparams, stats_dir=str(stats), campaign="bench"
    )
    setup = time.perf_counter() - started
    started = time.perf_counter()
    if method == "memit":
        rows = editor.edit_batch(requests, 0)
    else:
        rows = [editor.edit(request, step) for step, request in enumerate(requests)]
    seconds = time.perf_counter() - started
    evals = editor.evaluate(requests, list(range(len(requests))), protocol="final")
    return {
        "setup_s": setup,
        "edit_s": seconds,
        "success": statistics.fmean(r.success for r in rows),
        "p_new": statistics.fmean(r.p_new_after for r in rows),
        "final_es": statistics.fmean(e.es for e in evals if e.es is not None),
        "opt_steps": statistics.fmean(r.opt_steps for r in rows),
    }


def _stats(golden: GoldenSet, out: Path) -> Path:
    config = StatsConfig(layers=[1, 2], corpus=[golden.root / "corpus.txt"])
    save_stats(out, compute_stats(golden.root / "model", config, progress=False))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--golden", type=Path, default=golden_dir())
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--methods", default="rome,memit,alphaedit,ft-l,ft-m")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    golden = GoldenSet(args.golden)
    reference = json.loads((golden.root / "summary.json").read_text())
    with tempfile.TemporaryDirectory() as tmp:
        stats = _stats(golden, Path(tmp) / "stats")
        print(f"golden set {golden.root}; {args.repeats} repeats; {args.threads} threads")
        header = (
            f"{'method':10} {'config':9} {'setup s':>8} {'s/edit':>8} {'edits/s':>8} "
            f"{'speed-up':>8} {'opt steps':>9} {'success':>8} {'P(new)':>7} {'final ES':>8}"
        )
        print(header)
        for method in args.methods.split(","):
            results: dict[str, dict[str, float]] = {}
            for name, hparams in _variants(method, _hparams(golden, method)).items():
                runs = []
                for _ in range(args.repeats):
                    cached = name != "baseline"
                    if cached:  # fill the cache first; then it is only read
                        run_once(golden, stats, method, hparams, cached=True)
                    runs.append(run_once(golden, stats, method, hparams, cached=cached))
                results[name] = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
            base = results["baseline"]
            for name, r in results.items():
                total = r["setup_s"] + r["edit_s"]
                per_edit = total / 20
                speedup = (base["setup_s"] + base["edit_s"]) / total
                print(
                    f"{method:10} {name:9} {r['setup_s']:8.3f} {per_edit:8.3f} "
                    f"{1 / per_edit:8.2f} {speedup:7.2f}x {r['opt_steps']:9.1f} "
                    f"{r['success']:8.2f} {r['p_new']:7.3f} {r['final_es']:8.2f}"
                )
            if method in reference:
                ref = reference[method]
                print(
                    f"{method:10} reference {'':8} {1 / ref['edits_per_second']:8.3f} "
                    f"{ref['edits_per_second']:8.2f}   (reference code, golden summary.json; "
                    f"success {ref['success_rate_post']:.2f})"
                )


if __name__ == "__main__":
    main()
