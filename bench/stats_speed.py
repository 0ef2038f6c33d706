"""Covariance statistics: our one pass against one full pass per layer, 1 actor against 2,
and peak memory against corpus size.

    .venv/bin/python bench/stats_speed.py [--repeat 8] [--batch 32] [--out runs/bench-scale]

On the synthetic-300 testbed (a 4-layer GPT-2), layers [1, 2, 3], over its own corpus
repeated `--repeat` times:
1. Tokens per second of our pass (every layer's rewrite input from one forward pass per
   batch, stopped before the last layer's rewrite module) against the reference approach
   (ROME's layer_stats: for each layer, a full forward pass over the corpus), on the same
   batches in the same run; both sums must agree.
2. Wall time of the sharded job (`seqedit stats build --shards 4`) on 1 actor and on 2
   actors of 1 thread each.
3. Peak RSS of `compute_stats` in a fresh process on the corpus and on 4 times the corpus,
   at the same batch size: memory follows the batch, not the corpus.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import ray
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from seqedit.methods.covariance import accumulate_second_moments
from seqedit.pipeline.cli.prepared import ensure_testbed
from seqedit.pipeline.results.tables_format import format_table
from seqedit.pipeline.run.stats_job import build_stats_sharded
from seqedit.schemas.campaign import ResourcesSpec
from seqedit.testbed.build import CORPUS_FILE
from seqedit.workers.corpus import iter_documents
from seqedit.workers.model_io import load_model
from seqedit.workers.stats import StatsConfig, document_batches, model_context

LAYERS = [1, 2, 3]
PEAK_SCRIPT = """
import resource, sys, json
sys.path.insert(0, {root!r})
from seqedit.workers.stats import StatsConfig, compute_stats
config = StatsConfig.model_validate_json({config!r})
result = compute_stats({model!r}, config, progress=False)
print(json.dumps({{"peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                   "tokens": result.meta.token_count}}))
"""


def repeated_corpus(source: Path, times: int, folder: Path) -> Path:
    """The corpus file `times` over, as one text file of a document per line."""
    docs = list(iter_documents([source]))
    path = folder / f"corpus-x{times}.txt"
    path.write_text("\n".join(docs * times) + "\n", encoding="utf-8")
    return path


def one_pass_vs_per_layer(model_dir: Path, config: StatsConfig) -> dict:
    """Tokens/s of our pass and of one full forward pass per layer, same batches."""
    model, tokenizer = load_model(model_dir)
    names = [config.module_tmp.format(layer) for layer in config.layers]
    batches = list(document_batches(iter_documents(config.corpus), tokenizer, config,
                                    model_context(model)))  # fmt: skip
    tokens = int(sum(mask.sum() for _, mask in batches))
    started = time.perf_counter()
    ours = accumulate_second_moments(model, batches, names, torch.float64)
    t_ours = time.perf_counter() - started
    started = time.perf_counter()
    theirs = {name: full_pass_one_layer(model, batches, name) for name in names}
    t_theirs = time.perf_counter() - started
    error = max(float((ours[n].sum - theirs[n]).norm() / theirs[n].norm()) for n in names)
    return {
        "tokens": tokens,
        "per_layer_tokens_per_s": round(tokens / t_theirs),
        "one_pass_tokens_per_s": round(tokens / t_ours),
        "speedup": round(t_theirs / t_ours, 2),
        "max_rel_diff": float(f"{error:.1e}"),
    }


@torch.no_grad()
def full_pass_one_layer(model, batches, name: str) -> torch.Tensor:  # type: ignore[no-untyped-def]
    """The reference approach for one layer: the whole forward (to the logits) per batch,
    the layer's rewrite input summed over the non-pad tokens."""
    module = dict(model.named_modules())[name]
    seen: list[torch.Tensor] = []
    handle = module.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    total = None
    try:
        for ids, mask in batches:
            seen.clear()
            model(input_ids=ids, attention_mask=mask)
            keys = seen[0][mask.bool()].double()  # (n_tokens, d_in)
            total = keys.T @ keys if total is None else total + keys.T @ keys
    finally:
        handle.remove()
    assert total is not None
    return total


def actors_wall(model_dir: Path, config: StatsConfig, folder: Path) -> list[dict]:
    """Wall time of the sharded job on 1 and on 2 actors (4 shards, 1 thread each)."""
    rows, base = [], None
    for actors in (1, 2):
        started = time.perf_counter()
        _, report = build_stats_sharded(model_dir, config, folder / f"a{actors}", shards=4,
                                        actors=actors, resources=ResourcesSpec(torch_threads=1),
                                        progress=False)  # fmt: skip
        wall = time.perf_counter() - started
        base = base or wall
        rows.append({"actors": actors, "shards": report.shards, "tokens": report.tokens,
                     "wall_s": round(wall, 2), "speedup": round(base / wall, 2)})  # fmt: skip
    return rows


def peak_memory(model_dir: Path, config: StatsConfig, corpora: list[Path]) -> list[dict]:
    """Peak RSS of compute_stats in a fresh process, per corpus."""
    rows = []
    root = str(Path(__file__).resolve().parents[1])
    for corpus in corpora:
        setting = config.model_copy(update={"corpus": [str(corpus)]}).model_dump_json()
        script = PEAK_SCRIPT.format(root=root, config=setting, model=str(model_dir))
        out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                             check=True)  # fmt: skip
        measured = json.loads(out.stdout.strip().splitlines()[-1])
        rows.append({"corpus": corpus.name, "tokens": measured["tokens"],
                     "batch_size": config.batch_size,
                     "peak_rss_mib": round(measured["peak_mib"], 1)})  # fmt: skip
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=8)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--out", type=Path, default=Path("runs/bench-scale"))
    args = parser.parse_args()
    model_dir = args.out / "testbed"
    ensure_testbed(model_dir, 300, 0)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        corpus = repeated_corpus(model_dir / CORPUS_FILE, args.repeat, folder)
        bigger = repeated_corpus(model_dir / CORPUS_FILE, 4 * args.repeat, folder)
        config = StatsConfig(layers=LAYERS, corpus=[corpus], batch_size=args.batch)
        print(f"torch threads: {torch.get_num_threads()}, layers {LAYERS}, batch {args.batch}")
        print(format_table(pa.Table.from_pylist([one_pass_vs_per_layer(model_dir, config)])))
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
                 logging_level="ERROR")  # fmt: skip
        print(format_table(pa.Table.from_pylist(actors_wall(model_dir, config, folder))))
        ray.shutdown()
        print(format_table(pa.Table.from_pylist(peak_memory(model_dir, config,
                                                            [corpus, bigger]))))  # fmt: skip


if __name__ == "__main__":
    main()
