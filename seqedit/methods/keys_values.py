"""Shared ops of locate-then-edit methods: keys at the subject, and the helpers of value search.

- `module_io_at_subjects`: input (the key) and output of a module at the subject token of
  each filled template.
- `grouped_keys`: MEMIT keys, averaged within and then across context-template groups.

Value optimisation (ROME's v*, MEMIT's z) is `value_search`. Semantics follow the reference
implementation (kmeng01/memit `rome/compute_k.py`, `memit/compute_ks.py`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from itertools import pairwise

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from seqedit.methods.hooks import ModuleTrace
from seqedit.methods.tokens import EncodingMemo, FactToken, fill
from seqedit.schemas.requests import EditRequest

log = logging.getLogger(__name__)


def model_device(model: torch.nn.Module) -> torch.device:
    """Device of the model's first parameter."""
    return next(model.parameters()).device


@contextmanager
def frozen_parameters(model: torch.nn.Module) -> Iterator[None]:
    """Turn off requires_grad on every parameter; restore the previous flags on exit."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for param, _ in flags:
            param.requires_grad_(False)
        yield
    finally:
        for param, flag in flags:
            param.requires_grad_(flag)


@contextmanager
def restored_tensors(tensors: Sequence[torch.Tensor]) -> Iterator[None]:
    """Snapshot `tensors` (e.g. weights edited temporarily); copy them back on exit."""
    saved = [t.detach().clone() for t in tensors]
    try:
        yield
    finally:
        with torch.no_grad():
            for tensor, copy in zip(tensors, saved, strict=True):
                tensor.copy_(copy)


@torch.no_grad()
def module_io_at_subjects(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    templates: Sequence[str],
    subjects: Sequence[str],
    module: str,
    fact_token: FactToken,
    *,
    batch_size: int = 128,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Input and output of `module` at the lookup token of each `fill(template, subject)`.

    Texts are run in padded batches of `batch_size`, each forward pass only up to `module`.
    Returns (inputs (n, d_in), outputs (n, d_out)), detached, in float32.
    """
    (io,) = modules_io_at_subjects(
        model, tokenizer, templates, subjects, [module], fact_token, batch_size=batch_size
    )
    return io


@torch.no_grad()
def modules_io_at_subjects(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    templates: Sequence[str],
    subjects: Sequence[str],
    modules: Sequence[str],
    fact_token: FactToken,
    *,
    batch_size: int = 128,
    encodings: EncodingMemo | None = None,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """`module_io_at_subjects` of several modules from the same forward passes, which stop
    after the last of `modules` (list them in the order the network runs them).
    `encodings` reuses the tokenization of an earlier call on the same texts."""
    device = model_device(model)
    encode = encodings or EncodingMemo(tokenizer, device)
    ins: dict[str, list[torch.Tensor]] = {m: [] for m in modules}
    outs: dict[str, list[torch.Tensor]] = {m: [] for m in modules}
    for start in range(0, len(templates), batch_size):
        chunk_t = list(templates[start : start + batch_size])
        chunk_s = list(subjects[start : start + batch_size])
        inputs, positions = encode(chunk_t, chunk_s, fact_token)
        with ModuleTrace(
            model, modules, retain_input=True, retain_output=True, stop_after=modules[-1]
        ) as trace:
            model(**inputs)
        rows = torch.arange(len(chunk_t), device=device)
        cols = torch.tensor(positions, device=device)
        for module in modules:
            ins[module].append(trace.inputs[module][rows, cols])
            outs[module].append(trace.outputs[module][rows, cols])
    return [(torch.cat(ins[m]).float(), torch.cat(outs[m]).float()) for m in modules]


def grouped_keys(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    requests: Sequence[EditRequest],
    module: str,
    groups: Sequence[Sequence[str]],
    fact_token: FactToken,
) -> torch.Tensor:
    """(n, d_in) float32 keys: module input at the subject, averaged per group, then over groups.

    `groups` are context-template groups (MEMIT layout, e.g. [["{}"], ["<text>. {}", ...]]);
    each template's `{}` takes the request prompt (reference `memit/compute_ks.py`).
    """
    flat = [t for g in groups for t in g]
    prompts = [fill(t, r.prompt) for r in requests for t in flat]
    subjects = [r.subject for r in requests for _ in flat]
    inputs, _ = module_io_at_subjects(model, tokenizer, prompts, subjects, module, fact_token)
    return _group_means(inputs, len(requests), groups)


def keys_and_bare_outputs(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    requests: Sequence[EditRequest],
    modules: tuple[str, str],
    groups: Sequence[Sequence[str]],
    fact_token: FactToken,
    encodings: EncodingMemo | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(`grouped_keys` of modules[0] (n, d_in), output of modules[1] at the subject of each
    bare prompt (n, d_out)) from the same forward passes; `groups[0]` must be ["{}"] and
    modules[1] must run after modules[0] (MEMIT: the rewrite module, then the z block).

    The reference reads the outputs from a forward of the bare prompts of their own; a
    bare prompt's row in the padded batch gives the same values to float rounding."""
    if list(groups[0]) != ["{}"]:
        raise ValueError(f"first template group must be ['{{}}']: {groups[:1]}")
    flat = [t for g in groups for t in g]
    prompts = [fill(t, r.prompt) for r in requests for t in flat]
    subjects = [r.subject for r in requests for _ in flat]
    (inputs, _), (_, outputs) = modules_io_at_subjects(
        model, tokenizer, prompts, subjects, list(modules), fact_token, encodings=encodings
    )
    bare = outputs.view(len(requests), len(flat), -1)[:, 0]  # (n, d_out)
    return _group_means(inputs, len(requests), groups), bare


def _group_means(
    inputs: torch.Tensor, n_requests: int, groups: Sequence[Sequence[str]]
) -> torch.Tensor:
    """(n, d) of rows (n * n_flat, d) in request-major order: the mean within each template
    group, then across groups."""
    n_flat = sum(len(g) for g in groups)
    per_request = inputs.view(n_requests, n_flat, -1)  # (n, n_ctx, d_in)
    bounds = torch.tensor([0, *(len(g) for g in groups)]).cumsum(0).tolist()
    means = [per_request[:, a:b].mean(dim=1) for a, b in pairwise(bounds)]
    return torch.stack(means, dim=1).mean(dim=1)
