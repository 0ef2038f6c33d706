"""Scoring edited records: the metric rows of a chunk of records, batched, and the evaluator
worker that produces them at any step of a campaign from the base model plus the edit log.

A plain class (no Ray): the pipeline runs a pool of them beside the editor.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from seqedit.methods.config import names_for, validate_config
from seqedit.methods.fluency import fluency
from seqedit.methods.generation import generate_texts
from seqedit.methods.locality import perplexity
from seqedit.methods.metrics import (
    METRIC_VERSION,
    PERPLEXITY_VERSION,
    agreement,
    margin,
    mean,
    wins,
)
from seqedit.methods.registry import get_method
from seqedit.methods.scoring import TargetScore, score_targets
from seqedit.schemas.requests import EditRequest
from seqedit.schemas.tables import EvalRow, ModelEvalRow, Protocol
from seqedit.workers.edit_log import Steps
from seqedit.workers.edited_model import EditedModel
from seqedit.workers.model_io import load_model
from seqedit.workers.trained_parts import prepare_context

Predictions = list[tuple[int, ...]]
"""Argmax token ids at the answer positions of each neighbour prompt of one record."""


def _pairs_of(request: EditRequest) -> list[tuple[str, str, str]]:
    """(kind, prompt, target) for every prompt of a record: new and true/neighbour targets,
    and the portability answers."""
    pairs = [("rewrite_new", request.filled_prompt, request.target_new)]
    if request.target_true is not None:
        pairs.append(("rewrite_true", request.filled_prompt, request.target_true))
    for prompt in request.paraphrase_prompts:
        pairs.append(("para_new", prompt, request.target_new))
        if request.target_true is not None:
            pairs.append(("para_true", prompt, request.target_true))
    for neighbour in request.neighborhood_prompts:
        pairs.append(("nb_new", neighbour.prompt, request.target_new))
        pairs.append(("nb_true", neighbour.prompt, neighbour.target))
    for question in request.portability_prompts:
        pairs.append(("port", question.prompt, question.target))
    return pairs


def scored_pairs(requests: Sequence[EditRequest]) -> list[tuple[int, str, str, str]]:
    """(record index, kind, prompt, target) of every pair `evaluate_records` scores."""
    return [
        (index, kind, prompt, target)
        for index, request in enumerate(requests)
        for kind, prompt, target in _pairs_of(request)
    ]


def neighbour_predictions(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    requests: Sequence[EditRequest],
    *,
    batch_size: int = 64,
) -> list[Predictions]:
    """The argmax tokens at each neighbour answer's positions, per record (what locality
    agreement compares against when taken on the base model)."""
    flat = [(i, n.prompt, n.target) for i, r in enumerate(requests) for n in r.neighborhood_prompts]
    scores = score_targets(
        model, tokenizer, [f[1] for f in flat], [f[2] for f in flat], batch_size=batch_size
    )
    out: list[Predictions] = [[] for _ in requests]
    for (index, _, _), score in zip(flat, scores, strict=True):
        out[index].append(score.predicted)
    return out


def evaluate_records(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    requests: Sequence[EditRequest],
    edit_steps: Sequence[int],
    *,
    campaign: str,
    protocol: Protocol,
    n_edits_applied: int | Sequence[int],
    batch_size: int = 64,
    base_predictions: Sequence[Predictions] | None = None,
    fluency: Mapping[int, float] | None = None,
) -> list[EvalRow]:
    """CounterFact metrics (ES/PS/NS, EM/PM/NM), token accuracies and locality agreement of
    each record, all prompts of all records scored in padded batches of `batch_size` pairs.

    `n_edits_applied`: one count for all rows, or one per record. `base_predictions`
    (`neighbour_predictions` on the base model, per record) enables locality agreement;
    `fluency` (by case_id) fills the fluency column of the records generated from.
    """
    counts = (
        [n_edits_applied] * len(requests)
        if isinstance(n_edits_applied, int)
        else list(n_edits_applied)
    )
    flat = scored_pairs(requests)
    scores = score_targets(
        model, tokenizer, [f[2] for f in flat], [f[3] for f in flat], batch_size=batch_size
    )
    by_record: list[dict[str, list[TargetScore]]] = [{} for _ in requests]
    for (index, kind, _, _), result in zip(flat, scores, strict=True):
        by_record[index].setdefault(kind, []).append(result)
    rows = []
    for index, (request, step, groups) in enumerate(
        zip(requests, edit_steps, by_record, strict=True)
    ):
        probs = {kind: [s.prob for s in group] for kind, group in groups.items()}
        accuracy = {kind: [s.token_accuracy for s in group] for kind, group in groups.items()}
        rewrite_new = probs["rewrite_new"]
        rewrite_true = probs.get("rewrite_true", [])
        para_new, para_true = probs.get("para_new", []), probs.get("para_true", [])
        nb_new, nb_true = probs.get("nb_new", []), probs.get("nb_true", [])
        locality_agreement = None
        if base_predictions is not None and groups.get("nb_true"):
            now = [s.predicted for s in groups["nb_true"]]
            locality_agreement = agreement(base_predictions[index], now)
        rows.append(
            EvalRow(
                campaign=campaign,
                protocol=protocol,
                n_edits_applied=counts[index],
                case_id=request.case_id,
                relation_id=request.relation_id,
                edit_step=step,
                metric_version=METRIC_VERSION,
                es=wins(rewrite_new, rewrite_true) if rewrite_true else None,
                ps=wins(para_new, para_true) if para_true else None,
                ns=wins(nb_true, nb_new),
                em=margin(rewrite_new, rewrite_true) if rewrite_true else None,
                pm=margin(para_new, para_true) if para_true else None,
                nm=margin(nb_true, nb_new),
                rewrite_acc=groups["rewrite_new"][0].token_accuracy,
                rephrase_acc=mean(accuracy.get("para_new", [])),
                locality_acc=mean(accuracy.get("nb_true", [])),
                locality_agreement=locality_agreement,
                portability_acc=mean(accuracy.get("port", [])),
                fluency=(fluency or {}).get(request.case_id),
                n_paraphrases=len(request.paraphrase_prompts),
                n_neighbors=len(request.neighborhood_prompts),
                n_portability=len(request.portability_prompts),
            )
        )
    return rows


class EvalTask(BaseModel):
    """A chunk of records to score, each at the step its protocol asks for.

    retention/final: every record after the same `scored_after` steps; immediate: each
    record right after its own step (`scored_after[i] == edit_steps[i] + 1`).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    protocol: Protocol
    requests: list[EditRequest]
    edit_steps: list[int] = Field(description="Step at which each record was edited.")
    scored_after: list[int] = Field(description="Steps applied when each record is scored.")
    n_edits_applied: list[int] = Field(
        description="Requests edited when each is scored, rolled-back ones included (the "
        "evaluator leaves out those of steps the log shows rolled back)."
    )
    edits_per_step: int = Field(default=1, ge=1, description="Requests per edit step.")
    perplexity: bool = Field(
        default=False, description="Also measure held-out perplexity (retention/final)."
    )
    fluency_case_ids: list[int] = Field(
        default_factory=list,
        description="Records of the task whose generation prompts are sampled for fluency.",
    )

    @model_validator(mode="after")
    def _aligned(self) -> EvalTask:
        lengths = {len(self.requests), len(self.edit_steps), len(self.scored_after)}
        if len(lengths | {len(self.n_edits_applied)}) != 1:
            raise ValueError("requests, edit_steps, scored_after and n_edits_applied differ")
        if self.scored_after != sorted(self.scored_after):
            raise ValueError("scored_after must not decrease (the evaluator moves forward)")
        return self

    @property
    def last_step(self) -> int:
        """Steps the evaluator must stand after once the task is done."""
        return self.scored_after[-1] if self.scored_after else 0


class EvalResult(BaseModel):
    """What one task produced: per-record rows and model-level rows."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    rows: list[EvalRow]
    model_rows: list[ModelEvalRow]
    seconds: float = Field(description="Wall time of the task, replay included.")
    replayed_steps: int = Field(description="Edit-log steps applied to reach the task.")


class Evaluator:
    """Scores records at any step of a campaign: the base model, moved along the edit log.

    Stateless as far as results go: a task's rows depend only on the task and the edit log,
    so a restarted evaluator (or another one) gives the same rows. It keeps its place in
    the log between tasks, so tasks in step order cost only the steps between them.

    Args:
        model_dir: local Hugging Face model directory (the campaign's base model).
        method, hparams: the campaign's method; they say which modules the log edits.
        campaign: campaign name, written into every row.
        heldout: texts for held-out perplexity (tasks with `perplexity`).
        batch_size: (prompt, target) pairs per forward pass.
    """

    def __init__(
        self,
        model_dir: str,
        method: str,
        hparams: dict[str, Any],
        *,
        campaign: str,
        device: str = "cpu",
        torch_threads: int | None = None,
        heldout: Sequence[str] = (),
        batch_size: int = 64,
        seed: int = 0,
        fluency_tokens: int = 100,
    ) -> None:
        if torch_threads is not None:
            torch.set_num_threads(torch_threads)
        spec = get_method(method)
        config = validate_config(spec.config_cls, hparams, where=f"{spec.name} hparams")
        self.model, self.tokenizer = load_model(model_dir, device=device)
        # a memory-based method's memory lives in its context (no statistics needed, its
        # trained parts if it has any: SERAC's); the others need none: updates are weights
        context = (
            prepare_context(spec, self.model, self.tokenizer, config, model_dir)
            if spec.memory
            else None
        )
        names = names_for(self.model, config)
        self.edited = EditedModel(self.model, spec, config, names, context)
        self.campaign, self.batch_size = campaign, batch_size
        self.seed, self.fluency_tokens = seed, fluency_tokens
        self.heldout = list(heldout)
        self.n_steps = 0  # edit-log steps applied to the base model
        self.rolled_back: set[int] = set()  # of those, steps the log shows undone
        self._base_predictions: dict[int, Predictions] = {}

    def reset(self) -> None:
        """Back to the base model (step 0)."""
        self.edited.reset()
        self.n_steps = 0
        self.rolled_back = set()

    def advance(self, steps: Steps, until: int) -> int:
        """Apply logged steps `n_steps` .. `until - 1` (`parse_edit_log` output, updates of
        every kind; a rolled back step has none); returns how many were applied."""
        if until < self.n_steps:
            raise ValueError(f"evaluator stands after step {self.n_steps}; reset to reach {until}")
        missing = [s for s in range(self.n_steps, until) if s not in steps]
        if missing:
            raise ValueError(
                f"edit log lacks steps {missing[:3]}... needed to go from {self.n_steps} to {until}"
            )
        for step in range(self.n_steps, until):
            if not steps[step]:
                self.rolled_back.add(step)
            self.edited.apply(steps[step])
        applied, self.n_steps = until - self.n_steps, until
        return applied

    def run(self, task: EvalTask, steps: Steps) -> EvalResult:
        """Score the task's records, each after its `scored_after` steps, moving forward
        along `steps` (which must cover every step from where this evaluator stands)."""
        started = time.perf_counter()
        if task.scored_after and task.scored_after[0] < self.n_steps:
            self.reset()
        self._ensure_base_predictions(task.requests)
        rows, model_rows, replayed = [], [], 0
        groups: dict[int, list[int]] = {}
        for index, after in enumerate(task.scored_after):
            groups.setdefault(after, []).append(index)
        sampled = set(task.fluency_case_ids)
        for after, members in sorted(groups.items()):
            replayed += self.advance(steps, after)
            generated = [task.requests[i] for i in members if task.requests[i].case_id in sampled]
            rows.extend(
                evaluate_records(
                    self.model,
                    self.tokenizer,
                    [task.requests[i] for i in members],
                    [task.edit_steps[i] for i in members],
                    campaign=self.campaign,
                    protocol=task.protocol,
                    n_edits_applied=[self._applied(task, i) for i in members],
                    batch_size=self.batch_size,
                    base_predictions=[
                        self._base_predictions[task.requests[i].case_id] for i in members
                    ],
                    fluency=self._fluency(generated, after),
                )
            )
        if task.perplexity and self.heldout:
            model_rows.append(self._perplexity_row(task))
        seconds = time.perf_counter() - started
        return EvalResult(
            rows=rows, model_rows=model_rows, seconds=seconds, replayed_steps=replayed
        )

    def _applied(self, task: EvalTask, index: int) -> int:
        """Edits in the model when record `index` of `task` is scored: the requests gone
        through, less those of steps rolled back before it."""
        through, k = task.n_edits_applied[index], task.edits_per_step
        undone = sum(
            min(k, through - step * k)
            for step in self.rolled_back
            if step < task.scored_after[index]
        )
        return through - undone

    def _fluency(self, requests: Sequence[EditRequest], after: int) -> dict[int, float]:
        """Fluency of each record's generations (top-5 sampling, `fluency_tokens` new tokens
        per generation prompt), by case_id. The sampling stream is seeded by the campaign
        seed, the record and the step, so any evaluator draws the same texts."""
        scores: dict[int, float] = {}
        for request in requests:
            if not request.generation_prompts:
                continue
            seed = self.seed + 1_000_003 * request.case_id + after
            texts = generate_texts(
                self.model,
                self.tokenizer,
                request.generation_prompts,
                max_new_tokens=self.fluency_tokens,
                generator=torch.Generator().manual_seed(seed),
            )
            value = fluency(texts)
            if value is not None:
                scores[request.case_id] = value
        return scores

    def _perplexity_row(self, task: EvalTask) -> ModelEvalRow:
        started = time.perf_counter()
        value = perplexity(self.model, self.tokenizer, self.heldout)
        return ModelEvalRow(
            campaign=self.campaign,
            protocol=task.protocol,
            n_edits_applied=self._applied(task, len(task.requests) - 1),
            metric="perplexity",
            value=value,
            metric_version=PERPLEXITY_VERSION,
            n_items=len(self.heldout),
            seconds=time.perf_counter() - started,
        )

    def _ensure_base_predictions(self, requests: Sequence[EditRequest]) -> None:
        """Base-model argmax tokens on the neighbour prompts of records not seen yet
        (computed once per record: the edited weights are set aside meanwhile)."""
        new = list(
            {r.case_id: r for r in requests if r.case_id not in self._base_predictions}.values()
        )
        if not new:
            return
        edited = self.edited.snapshot() if self.n_steps else None
        if edited is not None:
            self.edited.reset()
        predictions = neighbour_predictions(
            self.model, self.tokenizer, new, batch_size=self.batch_size
        )
        if edited is not None:
            self.edited.restore(edited)
        self._base_predictions.update({r.case_id: p for r, p in zip(new, predictions, strict=True)})
