"""Held-out English perplexity of the CounterFact language-model testbed under N sequential
ROME edits, with generations before and after.

    .venv/bin/python bench/lm_testbed_drift.py --testbed runs/cf-testbed \
        --stats runs/cf-testbed-stats --dataset FILE [--edits 1000] [--every 250]

Edits the testbed's requests in order, then (past them) the next records of `--dataset`,
which the model never learned: every one is still a real ROME edit. Hparams are those of
examples/testbed-counterfact-rome.yaml. Prints the perplexity of heldout.jsonl (the first
500 sentences) every `--every` edits, its ratio to the base model's, the share of edits
that succeeded, and greedy continuations of a few English prompts before and after.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from seqedit.methods.generation import generate_texts
from seqedit.methods.locality import perplexity
from seqedit.schemas.loaders import load_requests
from seqedit.testbed.build import HELDOUT_FILE, load_testbed
from seqedit.workers.editor import SequentialEditor

SPEC = Path(__file__).resolve().parents[1] / "examples" / "testbed-counterfact-rome.yaml"
PROMPTS = ("The river", "A small house", "Music means", "The mother tongue of", "Paris is")


def generations(editor: SequentialEditor, tokens: int = 12) -> list[str]:
    """Greedy continuations of PROMPTS (top_k=1 of the generation metrics' decoder)."""
    return generate_texts(
        editor.model, editor.tokenizer, PROMPTS, max_new_tokens=tokens, top_k=1, generator=None
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--testbed", type=Path, required=True)
    parser.add_argument("--stats", type=Path, required=True)
    parser.add_argument("--dataset", type=Path, required=True)
    parser.add_argument("--edits", type=int, default=1000)
    parser.add_argument("--every", type=int, default=250)
    args = parser.parse_args()
    _, requests = load_testbed(args.testbed)
    known = {r.case_id for r in requests}
    extra = [r for r in load_requests(args.dataset, "auto").requests if r.case_id not in known]
    chain = [*requests, *extra][: args.edits]
    hparams = yaml.safe_load(SPEC.read_text())["hparams"]
    heldout = [json.loads(line)["text"] for line in (args.testbed / HELDOUT_FILE).open()][:500]
    editor = SequentialEditor(
        str(args.testbed), "rome", hparams, stats_dir=str(args.stats), campaign="drift"
    )
    base = perplexity(editor.model, editor.tokenizer, heldout)
    print(json.dumps({"edits": 0, "perplexity": round(base, 2), "ratio": 1.0}), flush=True)
    before = generations(editor)
    successes, started = 0, time.perf_counter()
    for step, request in enumerate(chain):
        successes += editor.edit(request, step).success
        if (step + 1) % args.every == 0 or step + 1 == len(chain):
            ppl = perplexity(editor.model, editor.tokenizer, heldout)
            print(json.dumps({
                "edits": step + 1, "perplexity": round(ppl, 2), "ratio": round(ppl / base, 3),
                "success": round(successes / (step + 1), 3),
                "s_per_edit": round((time.perf_counter() - started) / (step + 1), 3),
            }), flush=True)  # fmt: skip
    for old, new in zip(before, generations(editor), strict=True):
        print(f"before: {old!r}\nafter:  {new!r}")


if __name__ == "__main__":
    main()
