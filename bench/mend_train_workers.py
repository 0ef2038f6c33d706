"""MEND training on 1 and on 2 Ray Train workers at the same global batch: the speed-up per
step and how far apart the validation curves are, measured in the same run.

    .venv/bin/python bench/mend_train_workers.py [--model runs/bench-until-stable/gpt2-small/model]
        [--requests runs/cf-testbed/requests.jsonl] [--steps 12] [--batch 8]
        [--out runs/bench-mend-workers]

Both jobs run `seqedit train mend`'s job (`run_train_job`) from scratch on the same
train/validation split of the requests; 1 worker gets both CPUs (2 torch threads), each of
2 workers gets one. Printed: the median seconds per training step of each (the `time/step`
rows of the `train` table, the first step left out: it warms up), their ratio, and the
largest relative difference of any validation metric at any validation step. The default
model is the random-init gpt2-small shape that `bench/stats_until_stable.py` saves (12
layers, 768 wide; MEND on the MLP maps of its last 3 blocks).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from seqedit.pipeline.run.train_job import TrainJob, run_train_job  # noqa: E402
from seqedit.workers.mend_trainer import MendTrainingConfig  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    default_model = ROOT / "runs" / "bench-until-stable" / "gpt2-small" / "model"
    parser.add_argument("--model", type=Path, default=default_model)
    parser.add_argument("--requests", type=Path,
                        default=ROOT / "runs" / "cf-testbed" / "requests.jsonl")  # fmt: skip
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "bench-mend-workers")
    args = parser.parse_args()
    out = args.out.resolve()
    if out.exists():
        raise SystemExit(f"{out} exists: give another --out (the bench times fresh jobs)")
    out.mkdir(parents=True)
    lines = args.requests.read_text(encoding="utf-8").splitlines()
    train, val = out / "train.jsonl", out / "val.jsonl"
    train.write_text("\n".join(lines[: args.batch * args.steps]) + "\n")
    val.write_text("\n".join(lines[-16:]) + "\n")
    config = MendTrainingConfig(batch_size=args.batch, max_steps=args.steps,
                                val_every=args.steps // 3, lr=1e-4)  # fmt: skip
    step_seconds, curves = {}, {}
    for workers in (1, 2):
        job = TrainJob(model=str(args.model.resolve()), train=str(train), val=str(val),
                       out=str(out / f"workers-{workers}"), workers=workers,
                       cpus_per_worker=2 / workers, config=config)  # fmt: skip
        run_train_job(job)
        rows = pq.read_table(out / f"workers-{workers}" / "train").to_pylist()
        times = [r["value"] for r in rows if r["name"] == "time/step" and r["step"] > 1]
        step_seconds[workers] = statistics.median(times)
        measured = [r for r in rows if r["split"] == "val" and not r["name"].startswith("time/")]
        curves[workers] = {(r["step"], r["name"]): r["value"] for r in measured}
        print(f"{workers} worker(s): median {step_seconds[workers]:.3f} s per step "
              f"(global batch {args.batch}, {args.steps} steps)", flush=True)  # fmt: skip
    worst = max(
        abs(curves[2][key] - value) / max(abs(value), 1e-6) for key, value in curves[1].items()
    )
    print(f"speed-up 2 workers / 1: {step_seconds[1] / step_seconds[2]:.2f}x; largest relative "
          f"difference of a validation metric: {worst:.2e} ({len(curves[1])} values)")  # fmt: skip


if __name__ == "__main__":
    main()
