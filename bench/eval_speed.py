"""Prompts scored per second: our batched evaluator against a one-at-a-time loop.

    .venv/bin/python bench/eval_speed.py [--records 100] [--batch 64] [--repeats 3]
        [--out runs/bench-scale]

The baseline is the EasyEdit way, measured in the same run on the same model: one forward
pass per (prompt, target) pair over the full logits. Ours is `score_targets`, what
`evaluate_records` calls: every pair of every record at once, pairs sharing rows where
causality allows, rows sorted by length in padded batches of `--batch`, the output head
only at target positions. The pairs are those of CounterFact ES/PS/NS (rewrite,
paraphrase and neighbourhood prompts, each with target_new and target_true); the table
reports the largest difference in P between the two ways.
Two models: the synthetic-300 testbed (4 layers, 128 wide) and a random-init GPT-2 of
the gpt2-small shape (12 layers, 768 wide) on the testbed's tokenizer, where the work per
forward pass is realistic. Median of `--repeats` timings, on `torch.get_num_threads()`
threads.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import pyarrow as pa
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config, GPT2LMHeadModel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from seqedit.methods.scoring import score_targets
from seqedit.pipeline.cli.prepared import ensure_testbed
from seqedit.pipeline.results.tables_format import format_table
from seqedit.schemas.requests import spaced
from seqedit.testbed.build import load_testbed
from seqedit.workers.evaluator import scored_pairs


def _timed(fn, repeats: int) -> tuple[float, object]:
    times, result = [], None
    for _ in range(repeats):
        started = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times), result


@torch.no_grad()
def one_pair_at_a_time(model, tokenizer, pairs: list[tuple[str, str]]) -> list[float]:
    """The baseline: per (prompt, target) pair, one forward pass over prompt + target and
    the full logits, P = exp(-mean NLL of the target tokens)."""
    probs = []
    for prompt, target in pairs:
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        target_ids = tokenizer(spaced(target), add_special_tokens=False)["input_ids"]
        ids = torch.tensor([prompt_ids + target_ids])
        log_probs = torch.log_softmax(model(ids).logits[0].float(), dim=-1)  # (T, V)
        first = len(prompt_ids) - 1
        picked = log_probs[first : first + len(target_ids)].gather(
            1, torch.tensor(target_ids)[:, None]
        )
        probs.append(float(torch.exp(picked.mean())))
    return probs


def compare(name: str, model, tokenizer, requests, batch: int, repeats: int) -> dict:
    """Pairs/s of both ways on every pair `evaluate_records` scores for `requests`, and
    the largest difference in P between them."""
    pairs = [(prompt, target) for _, _, prompt, target in scored_pairs(requests)]
    prompts, targets = [p for p, _ in pairs], [t for _, t in pairs]

    def ours() -> list[float]:
        scores = score_targets(model, tokenizer, prompts, targets, batch_size=batch)
        return [s.prob for s in scores]

    ours()  # warm-up
    t_ours, p_ours = _timed(ours, repeats)
    t_base, p_base = _timed(lambda: one_pair_at_a_time(model, tokenizer, pairs), repeats)
    diff = max(abs(a - b) for a, b in zip(p_ours, p_base, strict=True))  # type: ignore[arg-type]
    return {
        "model": name,
        "records": len(requests),
        "pairs": len(pairs),
        "one_at_a_time_pairs_per_s": round(len(pairs) / t_base, 1),
        f"batch{batch}_pairs_per_s": round(len(pairs) / t_ours, 1),
        "speedup": round(t_base / t_ours, 2),
        "max_abs_diff_p": float(f"{diff:.2e}"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, default=100)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("runs/bench-scale"))
    args = parser.parse_args()
    model_dir = args.out / "testbed"
    ensure_testbed(model_dir, 300, 0)
    _, requests = load_testbed(model_dir)
    requests = requests[: args.records]
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    testbed = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    torch.manual_seed(0)
    small = GPT2LMHeadModel(
        GPT2Config(vocab_size=len(tokenizer), n_layer=12, n_embd=768, n_head=12,
                   n_positions=128, eos_token_id=0, bos_token_id=0, pad_token_id=0)
    ).eval()  # fmt: skip
    results = [
        compare("testbed 4x128", testbed, tokenizer, requests, args.batch, args.repeats),
        compare("gpt2-small shape 12x768", small, tokenizer, requests, args.batch, args.repeats),
    ]
    print(f"torch threads: {torch.get_num_threads()}")
    print(format_table(pa.Table.from_pylist(results)))


if __name__ == "__main__":
    main()
