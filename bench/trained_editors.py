"""Trained editors (MEND, SERAC) on a split CounterFact testbed's TEST split: single edits
(each on the base model) and sequential edits (100, 1,000 ... in order, scored at the end).

    .venv/bin/python bench/trained_editors.py --testbed runs/cf2k-testbed \\
        --method mend --checkpoint runs/mend-cf2k [--single 200] [--sequential 100,1000]
        [--json runs/trained-editors-mend.json]

The testbed must be built with `--split` (its requests-test.jsonl: subjects that no
training or tuning saw); the checkpoint is a `seqedit train mend|serac` output directory.
Each single edit is applied, its record scored (protocol `final`: ES/PS/NS as the
campaigns score them) and rolled back exactly (`undo_last`). Each sequential run applies
the first N test requests one after the other on the base model and scores all N at the
end. Printed: ES/PS/NS means, seconds per edit (the edit alone, without scoring), and for a
memory method the memory's size after the run. For SERAC also the routing: the share of
the edits' rephrases the classifier routes in scope and of their neighbourhood prompts
(which must stay out), with one edit in the memory and with every edit of a run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from seqedit.schemas.loaders import load_requests  # noqa: E402
from seqedit.schemas.requests import EditRequest  # noqa: E402
from seqedit.schemas.tables import EvalRow  # noqa: E402
from seqedit.workers.editor import SequentialEditor  # noqa: E402


def _means(rows: list[EvalRow]) -> dict[str, float]:
    def mean(name: str) -> float:
        values = [getattr(r, name) for r in rows if getattr(r, name) is not None]
        return statistics.fmean(values) if values else float("nan")

    return {"es": mean("es"), "ps": mean("ps"), "ns": mean("ns")}


def _editor(args: argparse.Namespace, keep_undo: bool) -> SequentialEditor:
    return SequentialEditor(
        str(args.testbed), args.method, {"checkpoint": str(args.checkpoint)},
        stats_dir=None, campaign="bench", keep_undo=keep_undo,
    )  # fmt: skip


def single_edits(args: argparse.Namespace, requests: list[EditRequest]) -> dict[str, float]:
    """Each request edited on the base model, scored, rolled back."""
    editor = _editor(args, keep_undo=True)
    rows, seconds = [], []
    for step, request in enumerate(requests):
        started = time.perf_counter()
        editor.edit(request, step)
        seconds.append(time.perf_counter() - started)
        rows += editor.evaluate([request], [step], protocol="final")
        editor.undo_last()
    return {**_means(rows), "n": len(rows), "s_per_edit": statistics.median(seconds)}


def _routed(context: object, tokenizer: object, prompts: list[str]) -> list[bool]:
    """Whether SERAC's classifier routes each prompt in scope of some edit in its memory
    (probability > generation_threshold at the prompt's last token)."""
    from seqedit.methods.serac import scope_hit_rate

    return [scope_hit_rate(context, tokenizer, [p])["scope_hit_rate"] > 0 for p in prompts]  # type: ignore[arg-type]


def serac_routing(editor: SequentialEditor, requests: list[EditRequest]) -> dict[str, float]:
    """Rephrases routed in scope and locality prompts routed in scope, with the memory as
    it is in `editor` (after the edits of `requests`)."""
    context, tokenizer = editor.edited.context, editor.tokenizer
    rephrases = [p for r in requests for p in r.paraphrase_prompts]
    neighbours = [n.prompt for r in requests for n in r.neighborhood_prompts]
    return {
        "rephrase_in_scope": statistics.fmean(_routed(context, tokenizer, rephrases)),
        "locality_in_scope": statistics.fmean(_routed(context, tokenizer, neighbours)),
    }


def single_routing(args: argparse.Namespace, requests: list[EditRequest]) -> dict[str, float]:
    """Per edit, with only that edit in the memory: its rephrases and its neighbours."""
    editor = _editor(args, keep_undo=True)
    ins, outs = [], []
    for step, request in enumerate(requests):
        editor.edit(request, step)
        routed = serac_routing(editor, [request])
        ins.append(routed["rephrase_in_scope"])
        outs.append(routed["locality_in_scope"])
        editor.undo_last()
    return {"rephrase_in_scope": statistics.fmean(ins), "locality_in_scope": statistics.fmean(outs),
            "n": len(requests)}  # fmt: skip


def sequential_edits(args: argparse.Namespace, requests: list[EditRequest]) -> dict[str, float]:
    """The requests edited in order, all scored at the end."""
    editor = _editor(args, keep_undo=False)
    started = time.perf_counter()
    edit_seconds = 0.0
    for step, request in enumerate(requests):
        row = editor.edit(request, step)
        edit_seconds += row.seconds
    total = time.perf_counter() - started
    rows = editor.evaluate(requests, list(range(len(requests))), protocol="final")
    result = {**_means(rows), "n": len(rows), "s_per_edit": edit_seconds / len(requests),
              "wall_s_per_edit": total / len(requests)}  # fmt: skip
    size = editor.edited.memory_size()
    if size is not None:
        result["memory_size"] = size
    if args.method == "serac":  # with every edit in the memory
        result |= serac_routing(editor, requests)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--testbed", type=Path, required=True)
    parser.add_argument("--method", choices=["mend", "serac"], required=True)
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--single", type=int, default=200, help="test requests edited alone")
    parser.add_argument("--sequential", default="100,1000", help="sequential run lengths")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(2)
    test = load_requests(args.testbed / "requests-test.jsonl").requests
    results: dict[str, dict[str, float]] = {}
    results["single"] = single_edits(args, test[: args.single])
    print(f"{args.method} single edits: {json.dumps(results['single'])}", flush=True)
    if args.method == "serac":
        routing = single_routing(args, test[: args.single])
        print(f"serac routing, one edit in memory: {json.dumps(routing)}", flush=True)
        results["single"] |= routing
    for n in (int(x) for x in args.sequential.split(",") if x):
        if n > len(test):
            print(f"skipping {n} sequential edits: the test split has {len(test)} requests")
            continue
        results[f"sequential_{n}"] = sequential_edits(args, test[:n])
        print(f"{args.method} {n} sequential: {json.dumps(results[f'sequential_{n}'])}", flush=True)
    print(f"\n| {args.method} | n | ES | PS | NS | s per edit |")
    print("|---|---|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['n']} | {r['es']:.3f} | {r['ps']:.3f} | {r['ns']:.3f} | "
              f"{r['s_per_edit']:.3f} |")  # fmt: skip
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
