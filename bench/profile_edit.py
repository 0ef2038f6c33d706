"""Where one edit's time goes: cProfile of the golden set's 20 edits through the real
`SequentialEditor`, and torch.profiler's operator table for the same edits.

    .venv/bin/python bench/profile_edit.py [--method rome] [--threads 2] [--top 25]
        [--golden DIR] [--torch-ops]

Runs the `exact` configuration of bench/edit_speed.py (the reference's semantics) after
one warm-up pass, so that caches and lazy imports are out of the picture. Prints the
seconds per edit split into the edit call (`EditMethod.edit`, what the reference times)
and our before/after scoring, then the functions with the most cumulative time.
"""

from __future__ import annotations

import argparse
import cProfile
import dataclasses
import io
import pstats
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.edit_speed import _hparams, _stats
from seqedit.workers.editor import SequentialEditor
from tests.golden import GoldenSet, golden_dir


def edit_all(editor: SequentialEditor, golden: GoldenSet, method: str) -> None:
    requests = golden.requests()
    if method == "memit":
        editor.edit_batch(requests, 0)
    else:
        for step, request in enumerate(requests):
            editor.edit(request, step)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--golden", type=Path, default=golden_dir())
    parser.add_argument("--method", default="rome")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--sort", default="cumulative", help="pstats key (tottime: own time)")
    parser.add_argument("--torch-ops", action="store_true", help="also torch.profiler's table")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    golden = GoldenSet(args.golden)
    hparams = _hparams(golden, args.method)
    with tempfile.TemporaryDirectory() as tmp:
        stats = _stats(golden, Path(tmp) / "stats")

        def fresh() -> SequentialEditor:
            return SequentialEditor(
                str(golden.root / "model"), args.method, hparams, stats_dir=str(stats),
                campaign="profile",
            )  # fmt: skip

        edit_all(fresh(), golden, args.method)  # warm-up: derived cache, lazy imports
        editor = fresh()
        calls: list[float] = []
        method_edit = editor.method.edit_batch if args.method == "memit" else editor.method.edit

        def timed(*a: object, **k: object) -> object:
            started = time.perf_counter()
            try:
                return method_edit(*a, **k)  # type: ignore[misc]
            finally:
                calls.append(time.perf_counter() - started)

        field = "edit_batch" if args.method == "memit" else "edit"
        editor.method = dataclasses.replace(editor.method, **{field: timed})
        profiler = cProfile.Profile()
        started = time.perf_counter()
        profiler.enable()
        edit_all(editor, golden, args.method)
        profiler.disable()
        total = time.perf_counter() - started
        n = len(golden.requests())
        edit_call = sum(calls) / n
        print(f"{args.method}: {total / n:.4f} s per request in all, edit call {edit_call:.4f} "
              f"s, scoring and bookkeeping {total / n - edit_call:.4f} s")  # fmt: skip
        out = io.StringIO()
        pstats.Stats(profiler, stream=out).sort_stats(args.sort).print_stats(args.top)
        print(out.getvalue())
        if args.torch_ops:
            editor = fresh()
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                edit_all(editor, golden, args.method)
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.top))


if __name__ == "__main__":
    main()
