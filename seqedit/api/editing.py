"""`seqedit.edit`: edit a Hugging Face model that is already in memory, from Python.

    outcome = seqedit.edit(model, tokenizer, requests, method="rome",
                           hparams={"layer": 5}, stats="runs/gpt2-stats")
    outcome.rows          # one EditRow per request: P(new)/P(true) before and after, ...
    outcome.deltas        # the edit log: every update as tensors (as `seqedit edit` saves)
    outcome.evaluate()    # ES/PS/NS, rewrite/rephrase/locality accuracy of every request

The model is edited in place by the same `SequentialEditor` a campaign runs (no Ray);
requests are applied one after another (`sequential=True`, the default) or as one
batched step (MEMIT, AlphaEdit).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from seqedit.api.campaign import progress_bar
from seqedit.pipeline.cli.hparams_import import read_hparams_file
from seqedit.schemas.loaders import load_requests
from seqedit.schemas.requests import EditRequest
from seqedit.schemas.tables import EditRow, EvalRow, Protocol
from seqedit.workers.editor import SequentialEditor

RequestsLike = str | Path | Iterable[EditRequest | Mapping[str, Any]]


def as_requests(requests: RequestsLike) -> list[EditRequest]:
    """EditRequests from a requests file (any format `seqedit` reads), or from records
    (EditRequest objects or mappings of its fields; case_id defaults to the position)."""
    if isinstance(requests, str | Path):
        return load_requests(requests).requests
    out = []
    for index, record in enumerate(requests):
        if isinstance(record, EditRequest):
            out.append(record)
        else:
            out.append(EditRequest.model_validate({"case_id": index, **dict(record)}))
    if not out:
        raise ValueError("no edit requests given")
    return out


def as_hparams(
    method: str | None, hparams: Mapping[str, Any] | str | Path | None
) -> tuple[str, dict]:
    """(method, hparams): a mapping of config fields, or a hparams file (flat, or what
    `seqedit hparams import` writes, which names its method)."""
    if isinstance(hparams, str | Path):
        return read_hparams_file(Path(hparams), method)
    if method is None:
        raise ValueError("give `method` (e.g. 'rome') with a mapping of hparams")
    return method, dict(hparams or {})


@dataclass
class EditOutcome:
    """What `edit` did: the edited model, a row per request, the updates as tensors.

    Attributes:
        model: the model (the same object, edited in place).
        rows: one EditRow per request, in order.
        deltas: the edit log (`seqedit edit --save-deltas`'s tensors).
        editor: the editor holding the model, to score or edit on.
        requests: the requests, in order.
    """

    model: PreTrainedModel
    rows: list[EditRow]
    deltas: dict[str, torch.Tensor]
    editor: SequentialEditor
    requests: list[EditRequest]

    def evaluate(self, protocol: Protocol = "final") -> list[EvalRow]:
        """Score every request on the model as it is now (ES/PS/NS and accuracies)."""
        steps = [row.step for row in self.rows]
        return self.editor.evaluate(self.requests, steps, protocol=protocol)


def edit(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    requests: RequestsLike,
    *,
    method: str | None = None,
    hparams: Mapping[str, Any] | str | Path | None = None,
    stats: str | Path | None = None,
    sequential: bool = True,
    model_dir: str | Path | None = None,
    progress: bool = True,
    seed: int = 0,
) -> EditOutcome:
    """Edit `model` in place with `requests`; see the module docstring.

    Args:
        stats: covariance stats directory (ROME, MEMIT, AlphaEdit need one).
        sequential: one edit per request in order; False: all as one batched step.
        model_dir: where `model` was loaded from, to check the stats were built for it.
        progress: a progress bar (a widget in a notebook).
    The model is put in eval mode with its parameters frozen during the edits (as the
    editor loads models); their `requires_grad` flags are restored afterwards.
    """
    name, fields = as_hparams(method, hparams)
    records = as_requests(requests)
    flags = [(p, p.requires_grad) for p in model.parameters()]
    model.eval()
    for param, _ in flags:
        param.requires_grad_(False)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    try:
        editor = SequentialEditor(
            None if model_dir is None else str(model_dir), name, fields,
            stats_dir=None if stats is None else str(stats), campaign="python",
            seed=seed, loaded=(model, tokenizer),
        )  # fmt: skip
        rows: list[EditRow] = []
        with progress_bar(len(records), f"{name} edits", progress) as update:
            if sequential:
                for step, request in enumerate(records):
                    rows.append(editor.edit(request, step))
                    update(step + 1, len(records))
            else:
                rows = editor.edit_batch(records, 0)
                update(len(records), len(records))
    finally:
        for param, flag in flags:
            param.requires_grad_(flag)
    return EditOutcome(model, rows, editor.edit_log_since(0), editor, records)
