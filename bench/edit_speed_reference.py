"""Per-edit speed against the ORIGINAL ROME/MEMIT/AlphaEdit code, side by side in one run.

    .venv/bin/python bench/edit_speed_reference.py --reference-dir /tmp/peers [--pairs 2]
        [--methods rome,memit,alphaedit] [--threads 2]

`--reference-dir` is the PEERS_DIR of ../shared/peers/README.md (the fetched and patched
reference code, its venv, tiny-gpt2/ and out_run/). Each pair runs
../shared/peers/run_reference.py in that venv, then ours, on the golden tiny GPT-2, in
the same protocol: every edit call timed alone, the whole run repeated from the original
weights (3 times for ROME and AlphaEdit, 5 for MEMIT's one batch of 20), the median
reported, one-time setup (C^-1, the null-space basis) excluded. Ours is the `exact`
configuration of bench/edit_speed.py, the update the original computes (the golden
tests); its edit call is the method's compute plus applying the update to the weights,
what the original's `apply_*_to_model` does. Ours is also reported with our own
before/after scoring of each edit included. Run it on an otherwise idle machine: the
ratio within a pair is the figure (absolute times drift by about 20 % between runs).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.edit_speed import _hparams, _stats
from seqedit.workers.editor import SequentialEditor
from tests.golden import GoldenSet, golden_dir

REPS = {"rome": 3, "memit": 5, "alphaedit": 3}
PEERS = Path(__file__).resolve().parents[2] / "shared" / "peers"


def reference_medians(reference_dir: Path, methods: list[str], threads: int) -> dict[str, float]:
    """Median seconds per edit call (per batch for MEMIT) of one run of the original."""
    out = reference_dir / "out_run"
    env = {**os.environ, "PEERS_DIR": str(reference_dir), "OMP_NUM_THREADS": str(threads)}
    python = str(reference_dir / "venv" / "bin" / "python")
    for method in methods:
        subprocess.run(
            [python, str(PEERS / "run_reference.py"), "--method", method, "--out", str(out)],
            check=True, cwd=reference_dir, env=env, stdout=subprocess.DEVNULL,
        )  # fmt: skip
    medians = {}
    for method in methods:
        run = json.loads((out / f"{method}_run.json").read_text())
        times = run.get("per_edit_seconds") or run["per_batch_seconds"]
        medians[method] = float(times["median_s"])
    return medians


def _timed(fn: Callable[..., Any], sink: list[float]) -> Callable[..., Any]:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            sink.append(time.perf_counter() - started)

    return wrapper


def our_medians(golden: GoldenSet, stats: Path, method: str) -> tuple[float, float]:
    """(median edit call, median edit with our scoring), seconds per edit (per batch for
    MEMIT), over REPS[method] runs from the base model."""
    hparams = _hparams(golden, method)
    requests = golden.requests()
    calls: list[float] = []
    whole: list[float] = []
    for _ in range(REPS[method]):
        editor = SequentialEditor(
            str(golden.root / "model"), method, hparams, stats_dir=str(stats), campaign="bench"
        )
        computed: list[float] = []
        applied: list[float] = []
        field = "edit_batch" if method == "memit" else "edit"
        compute = getattr(editor.method, field)
        editor.method = dataclasses.replace(editor.method, **{field: _timed(compute, computed)})
        editor.edited.apply = _timed(editor.edited.apply, applied)  # type: ignore[method-assign]
        batches = [requests] if method == "memit" else [[r] for r in requests]
        for step, batch in enumerate(batches):
            started = time.perf_counter()
            if method == "memit":
                editor.edit_batch(batch, step)
            else:
                editor.edit(batch[0], step)
            whole.append(time.perf_counter() - started)
        calls += [c + a for c, a in zip(computed, applied, strict=True)]
    return statistics.median(calls), statistics.median(whole)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reference-dir", type=Path, required=True)
    parser.add_argument("--golden", type=Path, default=golden_dir())
    parser.add_argument("--pairs", type=int, default=2)
    parser.add_argument("--methods", default="rome,memit,alphaedit")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    methods = [m for m in args.methods.split(",") if m]
    unknown = sorted(set(methods) - set(REPS))
    if unknown:
        parser.error(f"unknown method(s) {unknown}; choose from {', '.join(REPS)}")
    if not (args.reference_dir / "venv" / "bin" / "python").is_file():
        parser.error(f"{args.reference_dir}: no venv/bin/python (see {PEERS / 'README.md'})")
    torch.set_num_threads(args.threads)
    golden = GoldenSet(args.golden)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        stats = _stats(golden, Path(tmp) / "stats")
        for method in methods:  # warm-up: the derived-tensor cache, lazy imports
            our_medians(golden, stats, method)
        for pair in range(1, args.pairs + 1):
            reference = reference_medians(args.reference_dir, methods, args.threads)
            for method in methods:
                call, whole = our_medians(golden, stats, method)
                rows.append((pair, method, reference[method], call, whole))
                print(f"pair {pair} {method}: reference {reference[method]:.4f} s, ours "
                      f"{call:.4f} s ({reference[method] / call:.2f}x)", flush=True)  # fmt: skip
    print(f"\n{'pair':>4} {'method':<10} {'unit':<14} {'reference s':>11} {'ours: call':>10} "
          f"{'ratio':>6} {'ours: +scoring':>14} {'ratio':>6}")  # fmt: skip
    for pair, method, reference_s, call, whole in rows:
        unit = "batch of 20" if method == "memit" else "edit"
        print(f"{pair:>4} {method:<10} {unit:<14} {reference_s:11.4f} {call:10.4f} "
              f"{reference_s / call:5.2f}x {whole:14.4f} {reference_s / whole:5.2f}x")  # fmt: skip


if __name__ == "__main__":
    main()
