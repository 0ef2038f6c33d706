"""`seqedit train mend|serac`: train an editor as a Ray Train job (pipeline/run/train_job)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import yaml

from seqedit.pipeline.cli.handlers import CliError


def add_train_parser(sub: Any) -> None:
    """The `train` command and its options."""
    train = sub.add_parser(
        "train", help="train an editor that learns to edit (MEND, SERAC) as a Ray Train job"
    )
    train.add_argument("method", choices=["mend", "serac"], help="the editor to train")
    train.add_argument("--model", required=True, type=Path, help="HF model directory")
    train.add_argument("--train", required=True, type=Path, help="training requests (any format)")
    train.add_argument("--val", required=True, type=Path, help="validation requests")
    train.add_argument("--out", required=True, type=Path, help="output directory (resumable)")
    train.add_argument(
        "--config",
        type=Path,
        default=None,
        help="YAML of training fields (MEND: network, loss, lr, ...; SERAC: scope, loss, "
        "counterfactual, lr, cf_lr, ...; both: batch_size, max_steps, val_every, "
        "early_stopping)",
    )
    train.add_argument("--workers", type=int, default=1, help="data-parallel Ray Train workers")
    train.add_argument("--cpus-per-worker", type=float, default=1)
    train.add_argument("--gpus-per-worker", type=float, default=0)
    train.set_defaults(func=cmd_train)


def cmd_train(args: argparse.Namespace) -> None:
    from pydantic import ValidationError

    from seqedit.pipeline.run.train_job import TrainJob, run_train_job

    fields: dict[str, Any] = {}
    if args.config is not None:
        if not args.config.is_file():
            raise CliError(f"{args.config}: no such file")
        fields = yaml.safe_load(args.config.read_text()) or {}
        if not isinstance(fields, dict):
            raise CliError(f"{args.config}: expected a mapping of training fields")
    stopping = fields.pop("early_stopping", None)
    try:
        job = TrainJob(
            method=args.method, model=str(args.model), train=str(args.train), val=str(args.val),
            out=str(args.out), workers=args.workers, cpus_per_worker=args.cpus_per_worker,
            gpus_per_worker=args.gpus_per_worker, config=fields,
            **({"early_stopping": stopping} if stopping is not None else {}),
        )  # fmt: skip
    except ValidationError as exc:
        raise CliError(f"{args.config or 'training options'}: {exc}") from exc
    for path in (args.model, args.train, args.val):
        if not path.exists():
            raise CliError(f"{path}: no such file or directory")
    summary = run_train_job(job)
    print(json.dumps(summary, indent=1))
