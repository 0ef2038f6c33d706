"""Edit-log bytes per step of an FT edit on a GPT-2 XL-shaped MLP output projection, before
and after edit contract v2, and `seqedit validate`'s estimate of a 10,000-edit FT-M campaign.

    .venv/bin/python bench/dense_log_size.py [--steps 2] [--edits 10000] [--shard-size 500]

FT's update of `c_proj` (d_in 6400, d_out 1600) is a dense dW (1600, 6400). Before (edit-log
v1) it was logged as exact factors with an identity on the smaller side: left = I (1600,
1600), right = dW^T (6400, 1600). After (v2) it is one `DenseDelta`. Both are written
through `encode_edit_log` + `write_edit_log` to a temporary file, `--steps` steps of random
tensors of those shapes (no model is loaded), and measured on disk. The estimate builds
GPT-2 XL (`GPT2Config(n_embd=1600, n_layer=48, n_head=25)`) on the meta device.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch
from transformers import GPT2Config

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from seqedit.methods.updates import DenseDelta, LowRankDelta, Update
from seqedit.pipeline.cli.disk_plan import GB, estimate_disk, format_estimate
from seqedit.schemas.campaign import CampaignSpec
from seqedit.workers.edit_log import encode_edit_log, write_edit_log

D_IN, D_OUT = 6400, 1600
MODULE = "transformer.h.0.mlp.c_proj"


def _v1_step(delta: torch.Tensor) -> list[Update]:
    """dW (d_out, d_in) as v1 logged it: left = I (d_out, d_out), right = dW^T (d_in, d_out)."""
    return [LowRankDelta(MODULE, torch.eye(D_OUT), delta.T.contiguous())]


def _v2_step(delta: torch.Tensor) -> list[Update]:
    return [DenseDelta(MODULE, delta)]


def bytes_per_step(make_step: object, steps: int, folder: Path) -> float:
    """Size on disk of an edit-log file of `steps` FT steps, divided by `steps`."""
    generator = torch.Generator().manual_seed(0)
    entries = [
        (step, make_step(torch.randn(D_OUT, D_IN, generator=generator)))  # type: ignore[operator]
        for step in range(steps)
    ]
    path = folder / f"log-{id(make_step)}.safetensors"
    write_edit_log(path, encode_edit_log(entries), campaign="bench")
    size = path.stat().st_size
    path.unlink()
    return size / steps


def gpt2_xl_estimate(edits: int, shard_size: int) -> str:
    """`seqedit validate`'s estimate of an FT-M campaign of `edits` edits on GPT-2 XL."""
    spec = CampaignSpec.model_validate(
        {
            "name": "gpt2-xl-ft-m",
            "model": "gpt2-xl",
            "dataset": {"path": "counterfact.json"},
            "method": "ft-m",
            "hparams": {"layer": 0},
            "n_edits": edits,
            "shard_size": shard_size,
        }
    )
    estimate = estimate_disk(spec, GPT2Config(n_embd=1600, n_layer=48, n_head=25))
    assert estimate is not None
    return format_estimate(estimate)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=2, help="steps written per measurement")
    parser.add_argument("--edits", type=int, default=10_000)
    parser.add_argument("--shard-size", type=int, default=500, help="steps per shard")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        before = bytes_per_step(_v1_step, args.steps, Path(tmp))
        after = bytes_per_step(_v2_step, args.steps, Path(tmp))
    print(f"FT on c_proj (d_in {D_IN}, d_out {D_OUT}), edit-log bytes per step:")
    v1 = f"before (v1: left = I {D_OUT}x{D_OUT}, right = dW^T {D_IN}x{D_OUT})"
    v2 = f"after (v2: DenseDelta {D_OUT}x{D_IN})"
    print(f"  {v1:58} {before:>14,.0f}")
    print(f"  {v2:58} {after:>14,.0f}")
    print(f"  before / after: {before / after:.3f}")
    print(
        f"  {args.edits:,} FT edits (one per step): before {before * args.edits / GB:,.1f} GB, "
        f"after {after * args.edits / GB:,.1f} GB of edit log"
    )
    print(
        f"\nseqedit validate's estimate, GPT-2 XL FT-M, {args.edits:,} edits, "
        f"shards of {args.shard_size} steps (meta device, no weights):"
    )
    print(gpt2_xl_estimate(args.edits, args.shard_size))


if __name__ == "__main__":
    main()
