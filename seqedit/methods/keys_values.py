"""Shared ops of locate-then-edit methods: keys at the subject, and value optimisation.

- `module_io_at_subjects`: input (the key) and output of a module at the subject token of
  each filled template.
- `grouped_keys`: MEMIT keys, averaged within and then across context-template groups.
- `optimize_value`: gradient descent on a vector added to one module's output at the
  subject token, so that the model predicts the new target (ROME's v*, MEMIT's z).

Semantics follow the reference implementation (kmeng01/memit `rome/compute_v.py`,
`memit/compute_z.py`), including its quirks, documented where they occur.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import pairwise
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from seqedit.methods.arch import get_module
from seqedit.methods.hooks import ModuleTrace, reused_outputs
from seqedit.methods.tokens import (
    FactToken,
    batch_subject_positions,
    encode_batch,
    fill,
    last_token_positions,
)
from seqedit.schemas.requests import EditRequest, spaced

log = logging.getLogger(__name__)

KL_PROMPTS: tuple[str, ...] = ("{} is a",)


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

    Texts are run in padded batches of `batch_size`.
    Returns (inputs (n, d_in), outputs (n, d_out)), detached, in float32.
    """
    device = model_device(model)
    ins: list[torch.Tensor] = []
    outs: list[torch.Tensor] = []
    for start in range(0, len(templates), batch_size):
        chunk_t = list(templates[start : start + batch_size])
        chunk_s = list(subjects[start : start + batch_size])
        inputs = encode_batch(
            tokenizer, [fill(t, s) for t, s in zip(chunk_t, chunk_s, strict=True)], device
        )
        positions = batch_subject_positions(
            tokenizer, chunk_t, chunk_s, fact_token, inputs["attention_mask"]
        )
        with ModuleTrace(model, [module], retain_input=True, retain_output=True) as trace:
            model(**inputs)
        rows = torch.arange(len(chunk_t), device=device)
        cols = torch.tensor(positions, device=device)
        ins.append(trace.inputs[module][rows, cols])
        outs.append(trace.outputs[module][rows, cols])
    return torch.cat(ins).float(), torch.cat(outs).float()


@dataclass
class ValueResult:
    """Outcome of `optimize_value`.

    Attributes:
        init: (d,) float32 output of the edited module at the subject of the first prompt
            (the bare template), before optimisation.
        delta: (d,) optimised shift; the target value is `init + delta`.
        loss / initial_loss: total loss of the returned / the zero delta.
        steps: optimiser steps taken.
        target_prob / initial_target_prob: mean over rewriting prompts of
            exp(-mean target-token NLL), with the returned / the zero delta.
    """

    init: torch.Tensor
    delta: torch.Tensor
    loss: float
    initial_loss: float
    steps: int
    target_prob: float
    initial_target_prob: float

    @property
    def target(self) -> torch.Tensor:
        """(d,) the target value v* = init + delta."""
        return self.init + self.delta


class ValueSearch(NamedTuple):
    """How `optimize_value` searches: the reference's value-optimisation fields, which ROME
    and MEMIT/AlphaEdit configs share by name (`ValueSearch.of(config)`)."""

    fact_token: FactToken
    num_steps: int
    lr: float
    weight_decay: float
    clamp_norm_factor: float
    kl_factor: float
    early_stop_loss: float
    early_stop_top1: bool = False
    kl_prompts: Sequence[str] = KL_PROMPTS

    @classmethod
    def of(cls, config: Any) -> ValueSearch:
        """From a ROME or MEMIT/AlphaEdit config (`v_num_grad_steps`, `v_lr`, ...)."""
        return cls(
            fact_token=config.fact_token,
            num_steps=config.v_num_grad_steps,
            lr=config.v_lr,
            weight_decay=config.v_weight_decay,
            clamp_norm_factor=config.clamp_norm_factor,
            kl_factor=config.kl_factor,
            early_stop_loss=config.early_stop_loss,
            early_stop_top1=config.early_stop_top1,
            kl_prompts=config.kl_prompts,
        )


def optimize_value(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    request: EditRequest,
    context_templates: Sequence[str],
    *,
    edit_module: str,
    dim: int,
    search: ValueSearch,
    loss_module: str | None = None,
    ln_f_module: str | None = None,
    lm_head_module: str | None = None,
    reuse_outputs_of: Sequence[str] = (),
) -> ValueResult:
    """Find delta (dim,) such that adding it to `edit_module`'s output at the subject token
    makes the model predict `request.target_new` after every context template.

    Loss (reference semantics) =
        mean over rewriting prompts of the mean target-token NLL (teacher forcing)
      + kl_factor * KL(edited || initial) of the next-token distribution read AT THE SUBJECT
        TOKEN of each KL prompt ("{} is a"), `kl_div(init, cur, log_target=True, "batchmean")`
      + weight_decay * ||delta|| / ||init||^2   (the reference's norm is NOT squared).
    (Fields of `search`.) Adam(lr) for at most `num_steps` forward passes and
    `num_steps - 1` steps; stops as soon
    as the loss is below `early_stop_loss` or, with `early_stop_top1`, as soon as every
    target token is the argmax at its position in every rewriting prompt; after each step
    delta is projected into the ball of radius clamp_norm_factor * ||init||. The delta is
    added at the subject token of every prompt, KL prompts included.

    Args:
        context_templates: templates whose `{}` takes the request prompt; the FIRST one
            supplies `init` (ROME passes "{}" first, i.e. the bare prompt).
        edit_module: module whose primary output gets the delta, shape (B, T, dim).
        loss_module: when given, the target NLL is read from
            lm_head(ln_f(output of this module)) (MEMIT's v_loss_layer); else from the logits.
        reuse_outputs_of: modules whose output the delta cannot change (the blocks below the
            edit): computed in the first pass only (`reused_outputs`), same result, faster.
    """
    if not context_templates:
        raise ValueError("need at least one context template")
    device = model_device(model)
    target_ids = tokenizer(spaced(request.target_new), add_special_tokens=False)["input_ids"]
    if not target_ids:
        raise ValueError(f"case {request.case_id}: target_new tokenizes to nothing")
    n_target = len(target_ids)
    target_prefix = tokenizer.decode(target_ids[:-1])
    rewriting = [fill(ctx, request.prompt) + target_prefix for ctx in context_templates]
    prompts = [*rewriting, *search.kl_prompts]
    n_rw = len(rewriting)
    inputs = encode_batch(tokenizer, [fill(p, request.subject) for p in prompts], device)
    mask = inputs["attention_mask"]
    lookup = torch.tensor(
        batch_subject_positions(
            tokenizer, prompts, [request.subject] * len(prompts), search.fact_token, mask
        ),
        device=device,
    )  # (B,)
    rows = torch.arange(len(prompts), device=device)
    target_pos = last_token_positions(mask[:n_rw], n_target)  # (n_rw, T)
    target_t = torch.tensor(target_ids, device=device).expand(n_rw, n_target)

    delta = torch.zeros(dim, device=device, requires_grad=True)
    init: torch.Tensor | None = None

    def add_delta(name: str, out: torch.Tensor) -> torch.Tensor:
        nonlocal init
        if name != edit_module:
            return out
        if init is None:
            init = out[0, lookup[0]].detach().float().clone()
        shift = delta.to(out.dtype).expand(len(prompts), dim)
        return out.index_put((rows, lookup), shift, accumulate=True)

    loss_head = None
    if loss_module is not None:
        if ln_f_module is None or lm_head_module is None:
            raise ValueError("loss_module needs ln_f_module and lm_head_module")
        ln_f, lm_head = get_module(model, ln_f_module), get_module(model, lm_head_module)
        loss_head = (ln_f, lm_head)
    traced = [edit_module] if loss_module is None else [edit_module, loss_module]

    optimizer = torch.optim.Adam([delta], lr=search.lr)
    kl_init: torch.Tensor | None = None
    steps = 0
    loss_value = initial_loss = float("nan")
    prob = initial_prob = float("nan")
    with (
        frozen_parameters(model),
        torch.enable_grad(),
        reused_outputs(model, reuse_outputs_of),
    ):
        for it in range(search.num_steps):
            optimizer.zero_grad()
            with ModuleTrace(
                model,
                traced,
                retain_output=loss_module is not None,
                detach=False,
                edit_output=add_delta,
            ) as trace:
                logits = model(**inputs, use_cache=False).logits  # (B, L, V)
            assert init is not None
            kl_logits = logits[rows[n_rw:], lookup[n_rw:]].float()  # (n_kl, V)
            kl_log_probs = torch.log_softmax(kl_logits, dim=-1)
            if kl_init is None:
                kl_init = kl_log_probs.detach().clone()
            if loss_head is None:
                rw_logits = logits[rows[:n_rw, None], target_pos]  # (n_rw, T, V)
            else:
                hidden = trace.outputs[loss_module][rows[:n_rw, None], target_pos]  # type: ignore[index]
                rw_logits = loss_head[1](loss_head[0](hidden))
            log_probs = torch.log_softmax(rw_logits.float(), dim=-1)
            token_lp = torch.gather(log_probs, 2, target_t.unsqueeze(2)).squeeze(2)  # (n_rw, T)
            nll_each = -token_lp.sum(dim=1) / n_target  # (n_rw,)
            nll = nll_each.mean()
            kl = (
                search.kl_factor
                * F.kl_div(kl_init, kl_log_probs, log_target=True, reduction="batchmean")
                if len(search.kl_prompts)
                else nll.new_zeros(())
            )
            decay = search.weight_decay * (torch.norm(delta) / torch.norm(init) ** 2)
            loss = nll + kl + decay
            loss_value = float(loss.item())
            prob = float(torch.exp(-nll_each).mean().item())
            if it == 0:
                initial_loss, initial_prob = loss_value, prob
            log.debug(
                "value step %d: loss %.4f = nll %.4f + kl %.4f + decay %.4f; P(target) %.4f",
                it,
                loss_value,
                nll.item(),
                kl.item(),
                decay.item(),
                prob,
            )
            top1 = search.early_stop_top1 and bool((log_probs.argmax(-1) == target_t).all())
            if loss_value < search.early_stop_loss or top1 or it == search.num_steps - 1:
                break
            loss.backward()
            optimizer.step()
            steps += 1
            max_norm = search.clamp_norm_factor * init.norm()
            if delta.norm() > max_norm:
                with torch.no_grad():
                    delta[...] = delta * max_norm / delta.norm()
    assert init is not None
    return ValueResult(
        init=init,
        delta=delta.detach().clone(),
        loss=loss_value,
        initial_loss=initial_loss,
        steps=steps,
        target_prob=prob,
        initial_target_prob=initial_prob,
    )


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
    per_request = inputs.view(len(requests), len(flat), -1)  # (n, n_ctx, d_in)
    bounds = torch.tensor([0, *(len(g) for g in groups)]).cumsum(0).tolist()
    means = [per_request[:, a:b].mean(dim=1) for a, b in pairwise(bounds)]
    return torch.stack(means, dim=1).mean(dim=1)
