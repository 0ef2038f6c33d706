"""Covariance statistics until stable, against the full pass, measured in the same run.

    .venv/bin/python bench/stats_until_stable.py [--setting testbed gpt2-small]
        [--eps 0.05] [--shards 16] [--actors 2] [--probes 64] [--samples 20000]
        [--edits 100] [--no-campaigns] [--out runs/bench-until-stable]

For each setting, the same sharded stats job twice over the same corpus and layers: the
full pass, and `--until-stable EPS` (probes: `--probes` of the edited requests). Then
`--edits` sequential ROME and AlphaEdit campaigns of those requests on each stats, scored
right after each edit (protocol `immediate`). Printed: tokens used against the full pass,
the relative change of C^-1 k (and P k) at the stop, the actual relative error of C^-1 K
and P K over every edited request's keys against the full stats, ES/PS/NS of each campaign,
and the time ratio of the two stats jobs.

Settings:
- testbed: the 300-record CounterFact testbed (runs/cf-testbed; `seqedit testbed build
  --dataset ../shared/data/counterfact_dev.json --limit 300 --out runs/cf-testbed`) on its
  English corpus (corpus.jsonl); ROME at layer 0, AlphaEdit at layers 0 and 1.
- gpt2-small: a random-init GPT-2 of the gpt2-small shape (12 layers, 768 wide, seed 0) on
  the testbed's tokenizer, over a seeded sample of `--samples` (20,000) of the 151k WordNet
  sentences of ../shared/data (`--samples 0`: all of them, about half an hour per full
  pass on 2 cores); ROME at layer 5, AlphaEdit at layers 4 and 5.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
import yaml
from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from seqedit.methods.covariance_stability import probe_quantities  # noqa: E402
from seqedit.pipeline.results.tables_format import format_table  # noqa: E402
from seqedit.pipeline.results.views import query  # noqa: E402
from seqedit.pipeline.run.driver import run_campaign  # noqa: E402
from seqedit.pipeline.run.stats_job import build_stats_sharded  # noqa: E402
from seqedit.pipeline.run.stats_until_stable import UntilStable  # noqa: E402
from seqedit.schemas.campaign import load_spec  # noqa: E402
from seqedit.schemas.loaders import load_requests  # noqa: E402
from seqedit.workers.covariance_worker import CovarianceWorker  # noqa: E402
from seqedit.workers.stats import StatsConfig  # noqa: E402
from seqedit.workers.stats_store import tensors_sha256  # noqa: E402

TESTBED = ROOT / "runs" / "cf-testbed"
WORDNET = ROOT.parent / "shared" / "data" / "english_wordnet.txt"
SETTINGS: dict[str, dict[str, Any]] = {
    "testbed": {"rome_layer": 0, "alphaedit_layers": [0, 1], "v_loss_layer": 3},
    "gpt2-small": {"rome_layer": 5, "alphaedit_layers": [4, 5], "v_loss_layer": 11},
}
THRESHOLD = 2e-2  # AlphaEdit's default nullspace_threshold, as the campaigns use


def gpt2_small(out: Path) -> Path:
    """The random-init gpt2-small-shaped model on the testbed's tokenizer, saved once."""
    if (out / "config.json").is_file():
        return out
    tokenizer = AutoTokenizer.from_pretrained(TESTBED)
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(tokenizer), n_layer=12, n_embd=768, n_head=12,
                        n_positions=128, bos_token_id=tokenizer.bos_token_id,
                        eos_token_id=tokenizer.eos_token_id)  # fmt: skip
    GPT2LMHeadModel(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def build(model: Path, config: StatsConfig, out: Path, shards: int, actors: int,
          rule: UntilStable | None) -> tuple[float, Any]:  # fmt: skip
    """(seconds, result) of one sharded stats job (from scratch)."""
    if out.exists():
        raise SystemExit(f"{out} exists: give another --out (the bench times fresh jobs)")
    started = time.perf_counter()
    result, _ = build_stats_sharded(model, config, out, shards=shards, actors=actors,
                                    progress=False, until_stable=rule)  # fmt: skip
    return time.perf_counter() - started, result


def actual_errors(model: Path, config: StatsConfig, requests: list, full: Any,
                  stable: Any) -> dict[str, float]:  # fmt: skip
    """Largest relative error over layers of C^-1 K and P K (every edited request's keys)
    with the early-stopped stats against the full ones."""
    keys = CovarianceWorker(model, config).probe_keys(
        [r.prompt for r in requests], [r.subject for r in requests]
    )
    ours = probe_quantities(stable.moments(torch.float64), keys, THRESHOLD)
    theirs = probe_quantities(full.moments(torch.float64), keys, THRESHOLD)
    worst: dict[str, float] = {}
    for name, value in theirs.items():
        kind = name.split(".")[0]
        error = float((ours[name] - value).norm() / value.norm().clamp_min(1e-30))
        worst[kind] = max(worst.get(kind, 0.0), error)
    return worst


def campaign(folder: Path, model: Path, requests: Path, stats: Path, method: str,
             setting: dict[str, Any], edits: int) -> dict[str, float]:  # fmt: skip
    """Immediate ES/PS/NS of `edits` sequential edits."""
    if method == "rome":
        hparams = {"layer": setting["rome_layer"], "context_templates": ["{}"],
                   "v_num_grad_steps": 40, "v_lr": 0.25}  # fmt: skip
    else:
        hparams = {"layers": setting["alphaedit_layers"], "v_loss_layer": setting["v_loss_layer"],
                   "context_templates": [["{}"]], "L2": 0.5, "v_num_grad_steps": 40,
                   "v_lr": 0.25, "nullspace_threshold": THRESHOLD}  # fmt: skip
    spec = {"name": folder.name, "model": str(model), "dataset": {"path": str(requests)},
            "method": method, "hparams": hparams, "stats": str(stats), "n_edits": edits,
            "shard_size": edits, "eval_every": edits,
            "evaluation": {"immediate": True}}  # fmt: skip
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "spec.yaml").write_text(yaml.safe_dump(spec))
    run_campaign(load_spec(folder / "spec.yaml"), folder / "campaign")
    sql = ("SELECT avg(es) AS es, avg(ps) AS ps, avg(ns) AS ns FROM evals "
           "WHERE protocol = 'immediate'")  # fmt: skip
    return query(folder / "campaign", sql).to_pylist()[0]


def run_setting(name: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    setting = SETTINGS[name]
    if not (TESTBED / "config.json").is_file():
        raise SystemExit(f"{TESTBED}: build the CounterFact testbed first (see the docstring)")
    out = args.out / name
    model = TESTBED if name == "testbed" else gpt2_small(out / "model")
    corpus = TESTBED / "corpus.jsonl" if name == "testbed" else WORDNET
    layers = sorted({setting["rome_layer"], *setting["alphaedit_layers"]})
    samples = None if name == "testbed" or args.samples == 0 else args.samples
    config = StatsConfig(layers=layers, corpus=[str(corpus)], batch_size=32, max_length=128,
                         dtype="float64", n_samples=samples)  # fmt: skip
    requests_file = TESTBED / "requests.jsonl"
    requests = load_requests(requests_file).requests[: args.edits]
    rule = UntilStable.of_requests(args.eps, requests, args.probes, THRESHOLD)
    full_s, full = build(model, config, out / "stats-full", args.shards, args.actors, None)
    stable_s, stable = build(model, config, out / "stats-stable", args.shards, args.actors, rule)
    info = stable.meta.until_stable
    errors = actual_errors(model, config, requests, full, stable)
    summary = {k: v for k, v in info.items() if k != "history"}
    print(json.dumps({"setting": name, "until_stable": summary}), flush=True)
    for entry in info["history"]:
        print(
            f"  {entry['shards']:3d} shards {entry['tokens']:9d} tokens  largest relative "
            f"change {entry['max_change']}",
            flush=True,
        )
    digests = [tensors_sha256({str(k): a.sum for k, a in r.accumulators.items()})[:16]
               for r in (full, stable)]  # fmt: skip
    print(f"sums sha256: full {digests[0]}, until stable {digests[1]}", flush=True)
    rows = []
    for method in () if args.no_campaigns else ("rome", "alphaedit"):
        scores = {which: campaign(out / f"{method}-{which}", model, requests_file,
                                  out / f"stats-{which}", method, setting, args.edits)
                  for which in ("full", "stable")}  # fmt: skip
        rows.append({
            "setting": name, "method": method,
            "tokens_used": info["tokens_used"], "tokens_full": full.meta.token_count,
            "share": round(info["tokens_used"] / full.meta.token_count, 3),
            "stop_change": round(info["final_change"] or float("nan"), 4),
            "err_inv_k": round(errors["inverse_keys"], 4),
            "err_p_k": round(errors["projected_keys"], 4),
            **{f"{m}_{which}": round(scores[which][m], 3)
               for m in ("es", "ps", "ns") for which in ("full", "stable")},
            "s_full": round(full_s, 1), "s_stable": round(stable_s, 1),
            "time_ratio": round(full_s / stable_s, 2),
        })  # fmt: skip
        print(format_table_rows(rows[-1:]), flush=True)
    if args.no_campaigns:
        rows.append({"setting": name, "tokens_used": info["tokens_used"],
                     "tokens_full": full.meta.token_count,
                     "share": round(info["tokens_used"] / full.meta.token_count, 3),
                     "stop_change": round(info["final_change"] or float("nan"), 4),
                     "err_inv_k": round(errors["inverse_keys"], 4),
                     "err_p_k": round(errors["projected_keys"], 4),
                     "s_full": round(full_s, 1), "s_stable": round(stable_s, 1),
                     "time_ratio": round(full_s / stable_s, 2)})  # fmt: skip
    return rows


def format_table_rows(rows: list[dict[str, Any]]) -> str:
    import pyarrow as pa

    return format_table(pa.Table.from_pylist(rows), "table")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--setting", nargs="+", choices=sorted(SETTINGS),
                        default=["testbed", "gpt2-small"])  # fmt: skip
    parser.add_argument("--eps", type=float, default=0.05)
    parser.add_argument("--shards", type=int, default=16)
    parser.add_argument("--probes", type=int, default=64)
    parser.add_argument("--samples", type=int, default=20_000,
                        help="gpt2-small: WordNet sentences sampled (0: all 151k)")  # fmt: skip
    parser.add_argument("--actors", type=int, default=2, help="stats actors (1 CPU each)")
    parser.add_argument("--edits", type=int, default=100)
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "bench-until-stable")
    parser.add_argument("--no-campaigns", action="store_true",
                        help="time the two stats jobs only (no ES/PS/NS)")  # fmt: skip
    args = parser.parse_args()
    args.out = args.out.resolve()  # campaign specs resolve paths against their own folder
    rows = [row for name in args.setting for row in run_setting(name, args)]
    print("\n" + format_table_rows(rows))


if __name__ == "__main__":
    main()
