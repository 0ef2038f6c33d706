"""An editor in the shape of EasyEdit's `BaseEditor`, for users moving over.

    editor = seqedit.EasyEditor.from_hparams("hparams/ROME/gpt2-xl.yaml", model, tokenizer,
                                             stats="runs/gpt2-xl-stats")
    metrics, model, _ = editor.edit(prompts=..., target_new=..., subject=...,
                                    ground_truth=..., rephrase_prompts=...,
                                    locality_inputs={"neighborhood": {"prompt": [...],
                                                                      "ground_truth": [...]}},
                                    sequential_edit=True)

The arguments and the returned metric names are EasyEdit's: per request `case_id`,
`requested_rewrite`, `time`, and `pre`/`post` with `rewrite_acc`, `rephrase_acc`,
`locality` ({"<key>_acc": [...]}: agreement with the base model's tokens, as EasyEdit
scores locality) and `portability` ({"<key>_acc": [...]}), each a one-element list.
`post["seqedit"]` adds our whole evaluation row (ES/PS/NS, magnitudes, accuracies). With
`sequential_edit=True` every request is edited in order and all are scored after the last;
with False each is edited, scored and undone before the next (EasyEdit's two modes).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from seqedit.api.campaign import progress_bar
from seqedit.api.editing import as_hparams
from seqedit.schemas.requests import EditRequest, LocalityPrompt
from seqedit.schemas.tables import EvalRow
from seqedit.workers.editor import SequentialEditor
from seqedit.workers.evaluator import evaluate_records, neighbour_predictions

Inputs = Mapping[str, Mapping[str, Sequence[Any]]]
"""EasyEdit's locality/portability inputs: {key: {"prompt": [...], "ground_truth": [...]}},
one entry per request, each a string or a list of strings."""


def _listed(value: Any) -> list[str]:
    return [value] if isinstance(value, str) else list(value or [])


def _prompts(inputs: Inputs | None, key: str, index: int) -> list[LocalityPrompt]:
    if not inputs:
        return []
    group = inputs[key]
    prompts, answers = _listed(group["prompt"][index]), _listed(group["ground_truth"][index])
    if len(prompts) != len(answers):
        raise ValueError(f"{key}: request {index}: {len(prompts)} prompts, {len(answers)} answers")
    return [LocalityPrompt(prompt=p, target=a) for p, a in zip(prompts, answers, strict=True)]


def easyedit_requests(
    prompts: Sequence[str],
    target_new: Sequence[str],
    subject: Sequence[str],
    ground_truth: Sequence[str | None] | None = None,
    rephrase_prompts: Sequence[str | Sequence[str]] | None = None,
    locality_inputs: Inputs | None = None,
    portability_inputs: Inputs | None = None,
) -> list[EditRequest]:
    """Our requests from EasyEdit's parallel lists; locality and portability keys are
    merged in key order (`split_by_key` takes them apart again for scoring)."""
    if not (len(prompts) == len(target_new) == len(subject)):
        raise ValueError("prompts, target_new and subject must have the same length")
    requests = []
    for i, (prompt, new, subj) in enumerate(zip(prompts, target_new, subject, strict=True)):
        if subj not in prompt:
            raise ValueError(f"request {i}: subject {subj!r} is not in its prompt {prompt!r}")
        requests.append(
            EditRequest(
                case_id=i,
                prompt=prompt.replace(subj, "{}", 1),
                subject=subj,
                target_new=new,
                target_true=None if ground_truth is None else ground_truth[i],
                paraphrase_prompts=_listed(rephrase_prompts[i]) if rephrase_prompts else [],
                neighborhood_prompts=[
                    p for k in (locality_inputs or {}) for p in _prompts(locality_inputs, k, i)
                ],
                portability_prompts=[
                    p
                    for k in (portability_inputs or {})
                    for p in _prompts(portability_inputs, k, i)
                ],
            )
        )
    return requests


class EasyEditor:
    """`BaseEditor`-shaped editing of an in-memory model (see the module docstring)."""

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        method: str | None = None,
        hparams: Mapping[str, Any] | str | Path | None = None,
        *,
        stats: str | Path | None = None,
        model_dir: str | Path | None = None,
    ) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.method, self.hparams = as_hparams(method, hparams)
        self.stats, self.model_dir = stats, model_dir

    @classmethod
    def from_hparams(
        cls,
        hparams_file: str | Path,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        **kwargs: Any,
    ) -> EasyEditor:
        """From an EasyEdit hparams YAML (or a reference JSON), as `seqedit hparams import`
        reads it; or from a file that import wrote."""
        from seqedit.pipeline.cli.hparams_import import import_hparams

        path = Path(hparams_file)
        try:
            method, hparams = as_hparams(None, path)
        except ValueError:
            imported = import_hparams(path)
            method, hparams = imported.method, imported.hparams
        return cls(model, tokenizer, method, hparams, **kwargs)

    def edit(
        self,
        prompts: Sequence[str],
        target_new: Sequence[str],
        subject: Sequence[str],
        ground_truth: Sequence[str | None] | None = None,
        rephrase_prompts: Sequence[str | Sequence[str]] | None = None,
        locality_inputs: Inputs | None = None,
        portability_inputs: Inputs | None = None,
        sequential_edit: bool = True,
        verbose: bool = True,
        **_ignored: Any,
    ) -> tuple[list[dict[str, Any]], PreTrainedModel, None]:
        """Edit and score as EasyEdit does; returns (metrics per request, model, None)."""
        requests = easyedit_requests(
            prompts, target_new, subject, ground_truth, rephrase_prompts,
            locality_inputs, portability_inputs,
        )  # fmt: skip
        self.model.eval()
        for param in self.model.parameters():
            param.requires_grad_(False)
        editor = SequentialEditor(
            None if self.model_dir is None else str(self.model_dir), self.method, self.hparams,
            stats_dir=None if self.stats is None else str(self.stats), campaign="easyedit",
            loaded=(self.model, self.tokenizer),
        )  # fmt: skip
        views = [self._views(i, r, locality_inputs, portability_inputs)
                 for i, r in enumerate(requests)]  # fmt: skip
        flat = [view for request_views in views for view in request_views.values()]
        base = neighbour_predictions(self.model, self.tokenizer, flat)
        pre = self._score(views, base, 0)
        seconds: list[float] = []
        post: list[dict[str, EvalRow]] = []
        start_state = None if sequential_edit else editor.checkpoint()
        with progress_bar(len(requests), f"{self.method} edits", verbose) as update:
            for step, request in enumerate(requests):
                started = time.perf_counter()
                editor.edit(request, step)
                seconds.append(time.perf_counter() - started)
                if start_state is not None:  # score this edit alone, then undo it
                    mine = len(views[step])
                    first = sum(len(v) for v in views[:step])
                    post += self._score([views[step]], base[first : first + mine], 1, step)
                    editor.restore(start_state)
                update(step + 1, len(requests))
        if sequential_edit:
            post = self._score(views, base, len(requests))
        return [
            self._metrics(i, request, seconds[i], pre[i], post[i], locality_inputs,
                          portability_inputs)
            for i, request in enumerate(requests)
        ], self.model, None  # fmt: skip

    @staticmethod
    def _views(
        index: int, request: EditRequest, locality: Inputs | None, portability: Inputs | None
    ) -> dict[str, EditRequest]:
        """The request as scored: "all" (every prompt), and one view per locality and
        portability key holding only that key's prompts (EasyEdit reports each key)."""
        views = {"all": request}
        for key in locality or {}:
            views[f"locality:{key}"] = request.model_copy(
                update={"neighborhood_prompts": _prompts(locality, key, index),
                        "portability_prompts": []})  # fmt: skip
        for key in portability or {}:
            views[f"portability:{key}"] = request.model_copy(
                update={"neighborhood_prompts": [],
                        "portability_prompts": _prompts(portability, key, index)})  # fmt: skip
        return views

    def _score(
        self, views: list[dict[str, EditRequest]], base: list, applied: int, first_step: int = 0
    ) -> list[dict[str, EvalRow]]:
        """Every view of every request scored in one call, regrouped per request."""
        flat = [(i, name, r) for i, v in enumerate(views) for name, r in v.items()]
        rows = evaluate_records(
            self.model, self.tokenizer, [r for _, _, r in flat],
            [first_step + i for i, _, _ in flat], campaign="easyedit", protocol="final",
            n_edits_applied=applied, base_predictions=base,
        )  # fmt: skip
        out: list[dict[str, EvalRow]] = [{} for _ in views]
        for (i, name, _), row in zip(flat, rows, strict=True):
            out[i][name] = row
        return out

    def _metrics(
        self,
        index: int,
        request: EditRequest,
        seconds: float,
        pre: dict[str, EvalRow],
        post: dict[str, EvalRow],
        locality_inputs: Inputs | None,
        portability_inputs: Inputs | None,
    ) -> dict[str, Any]:
        def accuracies(rows: dict[str, EvalRow], with_locality: bool) -> dict[str, Any]:
            out: dict[str, Any] = {"rewrite_acc": [rows["all"].rewrite_acc]}
            if request.paraphrase_prompts:
                out["rephrase_acc"] = [rows["all"].rephrase_acc]
            if with_locality and locality_inputs:
                out["locality"] = {f"{k}_acc": [rows[f"locality:{k}"].locality_agreement]
                                   for k in locality_inputs}  # fmt: skip
            if portability_inputs:
                out["portability"] = {f"{k}_acc": [rows[f"portability:{k}"].portability_acc]
                                      for k in portability_inputs}  # fmt: skip
            return out

        rewrite = {
            "prompt": request.filled_prompt, "target_new": request.target_new,
            "ground_truth": request.target_true, "subject": request.subject,
            "rephrase_prompt": request.paraphrase_prompts or None,
            "locality": {k: {"prompt": v["prompt"][index], "ground_truth": v["ground_truth"][index]}
                         for k, v in (locality_inputs or {}).items()},
            "portability": {k: {"prompt": v["prompt"][index],
                                "ground_truth": v["ground_truth"][index]}
                            for k, v in (portability_inputs or {}).items()},
        }  # fmt: skip
        return {
            "case_id": index,
            "requested_rewrite": rewrite,
            "time": seconds,
            "pre": accuracies(pre, with_locality=False),
            "post": {**accuracies(post, with_locality=True), "seqedit": post["all"].model_dump()},
        }
