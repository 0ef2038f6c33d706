"""Evaluation throughput of the evaluator pool: 2 actors against 1, same tasks, same run.

    .venv/bin/python bench/eval_pool.py [--edits 60] [--every 10] [--chunk 16]
        [--out runs/bench-scale]

Applies `--edits` ROME edits to the synthetic-300 testbed with the editor, then has pools
of evaluator actors score what a campaign with `eval_every: --every` asks for: at every
point, all records edited so far (retention, then final), in tasks of `--chunk` records.
Each evaluator starts on the base model and moves along the edit log itself. Pools:
1 actor of 1 thread (the baseline), 2 actors of 1 thread each, and 1 actor of 2 threads
(the same cores in one process). Actors are started and warmed before the clock starts;
the time is submit-to-last-result. Every pool must write the same rows as the baseline.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import pyarrow as pa
import ray
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from seqedit.pipeline.eval_plan import due_tasks
from seqedit.pipeline.eval_pool import EvalPool
from seqedit.pipeline.prepared import TESTBED_HPARAMS, ensure_stats, ensure_testbed
from seqedit.pipeline.tables_format import format_table
from seqedit.schemas.campaign import CampaignSpec
from seqedit.testbed.build import load_testbed
from seqedit.workers.editor import SequentialEditor


def edit_log(model_dir: Path, stats: Path, requests: list, n: int) -> dict[str, torch.Tensor]:
    """The edit log of `n` sequential ROME edits of the testbed."""
    editor = SequentialEditor(str(model_dir), "rome", TESTBED_HPARAMS["rome"],
                              stats_dir=str(stats), campaign="bench")  # fmt: skip
    for step, request in enumerate(requests[:n]):
        editor.edit(request, step)
    return editor.take_edit_log()


def run_pool(spec: CampaignSpec, requests: list, log_ref: ray.ObjectRef) -> tuple[float, list]:
    """Seconds from first submit to last result, and the rows (sorted)."""
    pool = EvalPool(spec, heldout=[])
    try:
        pool.add_segment(0, spec.n_steps, log_ref)
        warm = due_tasks(spec, requests, 0, shard_start=0, shard_stop=spec.n_steps)
        (_, first), *_ = warm or due_tasks(spec, requests, spec.n_steps - 1, shard_start=0,
                                           shard_stop=spec.n_steps)  # fmt: skip
        base = first.model_copy(update={"requests": first.requests[:1], "edit_steps": [0],
                                        "scored_after": [0], "n_edits_applied": [0]})  # fmt: skip
        for _ in pool.slots:  # least-loaded: one warm-up task per actor
            pool.submit(base, None)
        pool.drain()
        tasks = [task for step in range(spec.n_steps)
                 for _, task in due_tasks(spec, requests, step, shard_start=0,
                                          shard_stop=spec.n_steps)]  # fmt: skip
        started = time.perf_counter()
        for index, task in enumerate(tasks):
            pool.submit(task, index)
        results = pool.drain()
        seconds = time.perf_counter() - started
    finally:
        pool.close()
    rows = sorted((r for _, res in results for r in res.rows),
                  key=lambda r: (r.n_edits_applied, r.case_id))  # fmt: skip
    return seconds, rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--edits", type=int, default=60)
    parser.add_argument("--every", type=int, default=10)
    parser.add_argument("--chunk", type=int, default=16)
    parser.add_argument("--out", type=Path, default=Path("runs/bench-scale"))
    args = parser.parse_args()
    model_dir = args.out / "testbed"
    ensure_testbed(model_dir, 300, 0)
    stats = ensure_stats(args.out / "stats", model_dir, [0])
    _, requests = load_testbed(model_dir)
    torch.set_num_threads(2)
    log = edit_log(model_dir, stats, requests, args.edits)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    log_ref = ray.put(log)
    pools = [("1 actor x 1 thread", 1, 1.0, 1), ("2 actors x 1 thread", 2, 1.0, 1),
             ("1 actor x 2 threads", 1, 2.0, 2)]  # fmt: skip
    results, baseline, reference = [], None, None
    for name, actors, cpus, threads in pools:
        spec = CampaignSpec.model_validate({
            "name": "bench", "model": str(model_dir), "dataset": {"path": "unused"},
            "method": "rome", "hparams": TESTBED_HPARAMS["rome"], "n_edits": args.edits,
            "eval_every": args.every, "resources": {"num_cpus": 0.01},
            "evaluation": {"actors": actors, "chunk": args.chunk,
                           "resources": {"num_cpus": cpus, "torch_threads": threads}},
        })  # fmt: skip
        seconds, rows = run_pool(spec, requests, log_ref)
        if reference is None:
            reference, baseline = rows, seconds
        results.append({
            "pool": name, "records_scored": len(rows), "seconds": round(seconds, 2),
            "records_per_s": round(len(rows) / seconds, 1),
            "vs_1_actor": round(baseline / seconds, 2),  # type: ignore[operator]
            "same_rows": rows == reference,
        })  # fmt: skip
    ray.shutdown()
    print(f"{args.edits} ROME edits on the synthetic-300 testbed, a point every "
          f"{args.every} edits, tasks of {args.chunk} records")  # fmt: skip
    print(format_table(pa.Table.from_pylist(results)))


if __name__ == "__main__":
    main()
