"""Scoring edited records on a model: one batched scoring call per chunk of records."""

from __future__ import annotations

from collections.abc import Sequence

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from seqedit.methods.metrics import METRIC_VERSION, margin, wins
from seqedit.methods.scoring import TargetScore, score_targets
from seqedit.schemas.requests import EditRequest
from seqedit.schemas.tables import EvalRow, Protocol


def _pairs_of(request: EditRequest) -> list[tuple[str, str, str]]:
    """(kind, prompt, target) for every prompt of a record: new and true/neighbour targets."""
    pairs = [("rewrite_new", request.filled_prompt, request.target_new)]
    if request.target_true is not None:
        pairs.append(("rewrite_true", request.filled_prompt, request.target_true))
        for prompt in request.paraphrase_prompts:
            pairs.append(("para_new", prompt, request.target_new))
            pairs.append(("para_true", prompt, request.target_true))
    for neighbour in request.neighborhood_prompts:
        pairs.append(("nb_new", neighbour.prompt, request.target_new))
        pairs.append(("nb_true", neighbour.prompt, neighbour.target))
    return pairs


def scored_pairs(requests: Sequence[EditRequest]) -> list[tuple[int, str, str, str]]:
    """(record index, kind, prompt, target) of every pair `evaluate_records` scores."""
    return [
        (index, kind, prompt, target)
        for index, request in enumerate(requests)
        for kind, prompt, target in _pairs_of(request)
    ]


def evaluate_records(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    requests: Sequence[EditRequest],
    edit_steps: Sequence[int],
    *,
    campaign: str,
    protocol: Protocol,
    n_edits_applied: int,
    batch_size: int = 64,
) -> list[EvalRow]:
    """CounterFact metrics (ES/PS/NS, EM/PM/NM, token accuracy) of each record, batched.

    All prompts of all records are scored in padded batches of `batch_size` pairs.
    """
    flat = scored_pairs(requests)
    scores = score_targets(
        model, tokenizer, [f[2] for f in flat], [f[3] for f in flat], batch_size=batch_size
    )
    by_record: list[dict[str, list[TargetScore]]] = [{} for _ in requests]
    for (index, kind, _, _), result in zip(flat, scores, strict=True):
        by_record[index].setdefault(kind, []).append(result)
    rows = []
    for request, step, groups in zip(requests, edit_steps, by_record, strict=True):
        probs = {kind: [s.prob for s in group] for kind, group in groups.items()}
        rewrite_new = probs["rewrite_new"]
        rewrite_true = probs.get("rewrite_true", [])
        para_new, para_true = probs.get("para_new", []), probs.get("para_true", [])
        nb_new, nb_true = probs.get("nb_new", []), probs.get("nb_true", [])
        rows.append(
            EvalRow(
                campaign=campaign,
                protocol=protocol,
                n_edits_applied=n_edits_applied,
                case_id=request.case_id,
                edit_step=step,
                metric_version=METRIC_VERSION,
                es=wins(rewrite_new, rewrite_true) if rewrite_true else None,
                ps=wins(para_new, para_true),
                ns=wins(nb_true, nb_new),
                em=margin(rewrite_new, rewrite_true) if rewrite_true else None,
                pm=margin(para_new, para_true),
                nm=margin(nb_true, nb_new),
                rewrite_acc=groups["rewrite_new"][0].token_accuracy,
                n_paraphrases=len(request.paraphrase_prompts),
                n_neighbors=len(request.neighborhood_prompts),
            )
        )
    return rows
