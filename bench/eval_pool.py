"""Evaluation throughput of the evaluator pool: 2 actors against 1, same tasks, same run.

    .venv/bin/python bench/eval_pool.py [--edits 200] [--every 20] [--chunk 32]
        [--repeats 3] [--out runs/bench-scale]

Applies `--edits` ROME edits to the synthetic-300 testbed with the editor, then has pools
of evaluator actors score what a campaign with `eval_every: --every` asks for: at every
point, all records edited so far (retention, then final), in tasks of `--chunk` records.
Each evaluator starts on the base model and moves along the edit log itself. Pools:
1 actor of 1 thread (the baseline), 2 actors of 1 thread each, and 1 actor of 2 threads
(the same cores in one process). Actors are started and warmed before the clock starts;
the time is submit-to-last-result. Every pool must write the rows of the baseline (the
largest difference of any metric is shown: 0 for the same thread count; another thread
count rounds sums in another order).

Then the same evaluation inside a campaign: the campaign's wall time with its evaluation
points (editor and one evaluator side by side) against the same campaign scored only at
the end; if evaluation blocked the editor, the first would take about the second plus
the 1-actor evaluation time above (median of `--repeats` runs of each).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import ray
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from seqedit.pipeline.cli.prepared import TESTBED_HPARAMS, ensure_stats, ensure_testbed
from seqedit.pipeline.results.tables_format import format_table
from seqedit.pipeline.results.views import query
from seqedit.pipeline.run.driver import run_campaign
from seqedit.pipeline.run.eval_plan import due_tasks
from seqedit.pipeline.run.eval_pool import EvalPool
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
        for _ in pool.actors.handles:  # least-loaded: one warm-up task per actor
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


def pipelined(args: argparse.Namespace, model_dir: Path, stats: Path, eval_seconds: float,
              eval_records: int) -> list[dict]:  # fmt: skip
    """Wall time of the campaign with its evaluation points against scored at the end only."""
    rows = []
    for name, every in (("scored at the end only", None), ("every --every edits", args.every)):
        spec = CampaignSpec.model_validate({
            "name": "bench-pipe", "model": str(model_dir),
            "dataset": {"path": str(model_dir / "requests.jsonl")}, "method": "rome",
            "hparams": TESTBED_HPARAMS["rome"], "stats": str(stats), "n_edits": args.edits,
            "eval_every": every, "resources": {"torch_threads": 1},
            "evaluation": {"chunk": args.chunk, "resources": {"torch_threads": 1}},
        })  # fmt: skip
        walls = []
        for _ in range(args.repeats):  # campaign wall times vary by seconds: the median
            with tempfile.TemporaryDirectory() as folder:
                started = time.perf_counter()
                run_campaign(spec, Path(folder) / "c")
                walls.append(time.perf_counter() - started)
                scored = query(Path(folder) / "c", "SELECT count(*) AS n FROM evals").to_pylist()
        rows.append({"campaign": name, "records_scored": scored[0]["n"],
                     "wall_seconds": round(statistics.median(walls), 2),
                     "runs": " ".join(f"{w:.1f}" for w in walls)})  # fmt: skip
    # the points the end-only campaign lacks, at the 1-actor rate measured above
    extra = eval_seconds * (rows[1]["records_scored"] - rows[0]["records_scored"]) / eval_records
    added = rows[1]["wall_seconds"] - rows[0]["wall_seconds"]
    rows[0].update(eval_seconds_added=None, wall_added=None, hidden=None)
    rows[1].update(eval_seconds_added=round(extra, 2), wall_added=round(added, 2),
                   hidden=f"{1 - added / extra:.0%}")  # fmt: skip
    return rows


def max_diff(rows: list, reference: list) -> float:
    """Largest absolute difference of any metric between two sets of rows (same records)."""
    if [(r.n_edits_applied, r.case_id) for r in rows] != [
        (r.n_edits_applied, r.case_id) for r in reference
    ]:
        raise AssertionError("the pools scored different records")
    fields = ("es", "ps", "ns", "em", "pm", "nm", "rewrite_acc", "rephrase_acc", "locality_acc",
              "locality_agreement")  # fmt: skip
    return max(
        abs((getattr(a, f) or 0.0) - (getattr(b, f) or 0.0))
        for a, b in zip(rows, reference, strict=True)
        for f in fields
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--edits", type=int, default=200)
    parser.add_argument("--every", type=int, default=20)
    parser.add_argument("--chunk", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3, help="campaign runs per setting")
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
            "max_abs_diff": max_diff(rows, reference),
        })  # fmt: skip
    campaigns = pipelined(args, model_dir, stats, baseline, len(reference))  # type: ignore[arg-type]
    ray.shutdown()
    print(f"{args.edits} ROME edits on the synthetic-300 testbed, a point every "
          f"{args.every} edits, tasks of {args.chunk} records")  # fmt: skip
    print(format_table(pa.Table.from_pylist(results)))
    print(format_table(pa.Table.from_pylist(campaigns)))


if __name__ == "__main__":
    main()
