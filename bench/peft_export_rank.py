"""`seqedit export --format peft` past full rank: a ROME campaign whose stacked edits exceed
the edited weight's rank, exported at several `--rank`s; the SVD's relative error and what it
does to ES/PS/NS, against the rebuilt model (the campaign's own weights).

    .venv/bin/python bench/peft_export_rank.py [--edits 300] [--ranks 0,64,32,16,8]
        [--out runs/bench-peft-export]

The synthetic-300 testbed of `make demo` (built under --out when missing), ROME at layer 0
(its `testbed_hparams`): the MLP output projection there is 128 x 512, so 300 rank-one edits
stack to 300 columns, past its full rank 128. Rank 0 means the default (full rank: the SVD
compresses without loss). Each adapter is loaded by peft on the base model; the scores are
every edited record's, after the last edit (protocol "final").
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import pyarrow as pa
import torch
import yaml
from peft import PeftModel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from sequential_efficacy import HPARAMS, _testbed

from seqedit.pipeline.cli.campaign_ops import rebuild_model
from seqedit.pipeline.cli.main import main as cli
from seqedit.pipeline.cli.peft_export import export_peft
from seqedit.pipeline.results.tables_format import format_table
from seqedit.testbed.build import load_testbed
from seqedit.workers.evaluator import evaluate_records
from seqedit.workers.model_io import load_model


def campaign(out: Path, model: Path, stats: Path, n: int) -> Path:
    """A ROME campaign of the first `n` testbed records (a finished one is left as it is)."""
    spec = {
        "name": "peft-export-rank", "model": str(model.resolve()),
        "dataset": {"path": str((model / "requests.jsonl").resolve())}, "method": "rome",
        "hparams": dict(HPARAMS["rome"]), "stats": str(stats.resolve()), "n_edits": n,
        "shard_size": n, "eval_every": n,
    }  # fmt: skip
    spec_file, campaign_dir = out / "campaign.yaml", out / "campaign"
    spec_file.write_text(yaml.safe_dump(spec))
    if cli(["run", str(spec_file), "--out", str(campaign_dir), "--quiet"]) != 0:
        raise SystemExit(f"{campaign_dir}: the campaign failed")
    return campaign_dir


def scores(model: torch.nn.Module, tokenizer, requests: list) -> dict[str, float]:
    rows = evaluate_records(
        model, tokenizer, requests, list(range(len(requests))), campaign="bench",
        protocol="final", n_edits_applied=len(requests),
    )  # fmt: skip
    return {m: round(statistics.fmean(getattr(r, m) for r in rows), 3) for m in ("es", "ps", "ns")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--edits", type=int, default=300)
    parser.add_argument("--ranks", default="0,64,32,16,8")
    parser.add_argument("--out", type=Path, default=Path("runs/bench-peft-export"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    model_dir, stats = _testbed(args.out)
    _, requests = load_testbed(model_dir)
    requests = requests[: args.edits]
    campaign_dir = campaign(args.out, model_dir, stats, args.edits)
    rebuild_model(campaign_dir, args.edits - 1, args.out / "rebuilt")
    rebuilt, tokenizer = load_model(args.out / "rebuilt")
    rows = [{"adapter": "none (rebuilt model)", "r": None, "max_rel_error": None,
             **scores(rebuilt, tokenizer, requests)}]  # fmt: skip
    base, _ = load_model(model_dir)
    rows.append({"adapter": "none (base model)", "r": None, "max_rel_error": None,
                 **scores(base, tokenizer, requests)})  # fmt: skip
    for rank in (int(r) for r in args.ranks.split(",")):
        out = args.out / f"adapter-r{rank}"
        report = export_peft(campaign_dir, args.edits - 1, out, rank=rank or None)
        adapted = PeftModel.from_pretrained(base, str(out)).eval()
        rows.append({
            "adapter": "full rank" if rank == 0 else f"--rank {rank}", "r": report.r,
            "max_rel_error": round(report.max_relative_error, 6),
            **scores(adapted.get_base_model(), tokenizer, requests),  # LoRA layers injected
        })  # fmt: skip
        base = adapted.unload()
        print(rows[-1], flush=True)
    stacked = report.modules[0].stacked_rank
    print(f"\nROME, {args.edits} edits stacked to {stacked} columns per module")
    print(format_table(pa.Table.from_pylist(rows)))


if __name__ == "__main__":
    main()
