"""Value optimisation: gradient descent on a vector added to one module's output at the
subject token, so that the model predicts the new target (ROME's v*, MEMIT's z).

Semantics follow the reference implementation (kmeng01/memit `rome/compute_v.py`,
`memit/compute_z.py`), including its quirks, documented where they occur.

Loss (reference semantics) =
    mean over rewriting prompts of the mean target-token NLL (teacher forcing)
  + kl_factor * KL(edited || initial) of the next-token distribution read AT THE SUBJECT
    TOKEN of each KL prompt ("{} is a"), `kl_div(init, cur, log_target=True, "batchmean")`
  + weight_decay * ||delta|| / ||init||^2   (the reference's norm is NOT squared).
(Fields of `ValueSearch`.) Adam(lr) for at most `num_steps` forward passes and
`num_steps - 1` steps; stops as soon as the loss is below `early_stop_loss` or, with
`early_stop_top1`, as soon as every target token is the argmax at its position in every
rewriting prompt; after each step delta is projected into the ball of radius
clamp_norm_factor * ||init||. The delta is added at the subject token of every prompt, KL
prompts included.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from seqedit.methods.adam import LeanAdam
from seqedit.methods.arch import ModuleNames, get_module
from seqedit.methods.block_replay import BlockReplay
from seqedit.methods.fused_activation import fused_tanh_gelu
from seqedit.methods.hooks import ModuleTrace, reused_outputs
from seqedit.methods.keys_values import frozen_parameters, model_device
from seqedit.methods.tokens import (
    FactToken,
)
from seqedit.methods.value_batch import RequestRows, ValueBatch, target_nll
from seqedit.schemas.requests import EditRequest

log = logging.getLogger(__name__)

KL_PROMPTS: tuple[str, ...] = ("{} is a",)


@dataclass
class ValueResult:
    """Outcome of `optimize_values` for one request.

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
    """How `optimize_values` searches: the reference's value-optimisation fields, which ROME
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
    batch_rows: int = 512

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
            batch_rows=config.value_batch_rows,
        )


class _SubjectShifts:
    """`edit_output` hook of `ModuleTrace`: adds request j's `deltas[j]` (d,) to `module`'s
    output (B, L, d) at the subject position of each of j's rows, and keeps that output's
    value at the subject of j's first prompt from the first pass (`initial(j)`, (d,)
    float32)."""

    def __init__(self, module: str, batch: ValueBatch, dim: int) -> None:
        self.module, self.batch, self.dim = module, batch, dim
        device = batch.rows.device
        self.deltas = [torch.zeros(dim, device=device, requires_grad=True) for _ in batch.requests]
        self._init: list[torch.Tensor] | None = None

    def __call__(self, name: str, out: torch.Tensor) -> torch.Tensor:
        if name != self.module:
            return out
        requests = self.batch.requests
        if self._init is None:
            self._init = [out[r.rows[0], r.lookup[0]].detach().float().clone() for r in requests]
        pieces = zip(requests, self.deltas, strict=True)
        shift = torch.cat([d.to(out.dtype).expand(len(r.rows), self.dim) for r, d in pieces])
        return out.index_put((self.batch.rows, self.batch.lookup), shift, accumulate=True)

    def initial(self, j: int) -> torch.Tensor:
        if self._init is None:
            raise RuntimeError(f"{self.module} did not run: no value to shift")
        return self._init[j]

    def clamp_(self, j: int, factor: float) -> None:
        """Project deltas[j] into the ball of radius factor * ||initial(j)||."""
        delta, max_norm = self.deltas[j], factor * self.initial(j).norm()
        if delta.norm() > max_norm:
            with torch.no_grad():
                delta[...] = delta * max_norm / delta.norm()


def _loss_terms(
    nll_each: torch.Tensor,
    kl_log_probs: torch.Tensor,
    kl_init: torch.Tensor,
    delta: torch.Tensor,
    init: torch.Tensor,
    search: ValueSearch,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(nll, kl, decay), scalars: the mean target NLL over the (n_rw,) prompts, the KL term
    of the (n_kl, V) log-probabilities against the first pass's, and the norm penalty."""
    nll = nll_each.mean()
    kl = (
        search.kl_factor * F.kl_div(kl_init, kl_log_probs, log_target=True, reduction="batchmean")
        if len(search.kl_prompts)
        else nll.new_zeros(())
    )
    return nll, kl, search.weight_decay * (torch.norm(delta) / torch.norm(init) ** 2)


@dataclass
class _Progress:
    """Where one request's search stands."""

    kl_init: torch.Tensor | None = None  # (n_kl, V) log-probs of the first pass
    loss: float = float("nan")
    initial_loss: float = float("nan")
    prob: float = float("nan")
    initial_prob: float = float("nan")
    steps: int = 0
    done: bool = False


def optimize_values(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    requests: Sequence[EditRequest],
    context_templates: Sequence[str],
    *,
    names: ModuleNames,
    edit_module: str,
    dim: int,
    search: ValueSearch,
    loss_module: str | None = None,
    reuse_outputs_of: Sequence[str] = (),
    replay_from: int | None = None,
) -> list[ValueResult]:
    """For each request, find delta (dim,) such that adding it to `edit_module`'s output at
    the subject token makes the model predict `request.target_new` after every context
    template (the loss and the stopping rules are in the module docstring).

    The searches are independent: each request has its own delta, Adam state, loss and
    stop. They share forward passes: up to `search.batch_rows` prompt rows go through the
    model together, and a request that has stopped keeps its delta while the others go on.
    Logits are computed at the scored positions only, and GPT-2's composed tanh-GELU runs
    as torch's fused kernel (`fused_tanh_gelu`; equal to float rounding).

    Args:
        context_templates: templates whose `{}` takes the request prompt; the FIRST one
            supplies `init` (ROME passes "{}" first, i.e. the bare prompt).
        names: the model's module names (blocks, final norm, LM head).
        edit_module: module whose primary output gets the delta, shape (B, T, dim).
        loss_module: when given, the target NLL is read from
            lm_head(ln_f(output of this module)) (MEMIT's v_loss_layer); else from the logits.
        reuse_outputs_of: modules whose output the delta cannot change (the edited block's
            attention and MLP, or the block itself): computed in the first pass only
            (`reused_outputs`), same result, faster.
        replay_from: the block holding `edit_module`: after the first pass only it and the
            blocks above run (`BlockReplay`), same result, faster. None runs the whole
            network at every step.
    """
    if not context_templates:
        raise ValueError("need at least one context template")
    per_group = max(1, search.batch_rows // (len(context_templates) + len(search.kl_prompts)))
    results: list[ValueResult] = []
    for first in range(0, len(requests), per_group):
        batch = ValueBatch.build(
            tokenizer, requests[first : first + per_group], context_templates, search,
            model_device(model),
        )  # fmt: skip
        site = _ShiftSite(names, edit_module, dim, loss_module, reuse_outputs_of, replay_from)
        with fused_tanh_gelu(model):
            results += _search_batch(model, batch, site, search)
    return results


class _ShiftSite(NamedTuple):
    """Where a value search shifts and reads (the arguments of `optimize_values`)."""

    names: ModuleNames
    edit_module: str
    dim: int
    loss_module: str | None
    reuse_outputs_of: Sequence[str]
    replay_from: int | None


def _search_batch(
    model: PreTrainedModel, batch: ValueBatch, site: _ShiftSite, search: ValueSearch
) -> list[ValueResult]:
    """`optimize_values` on the requests of one batch."""
    shift = _SubjectShifts(site.edit_module, batch, site.dim)
    progress = [_Progress() for _ in batch.requests]
    head = model.get_output_embeddings()
    ln_f = get_module(model, site.names.ln_f_module)  # looked up once, not at every step
    lm_head = get_module(model, site.names.lm_head_module)

    def rewrite_logits(rows: RequestRows, states: torch.Tensor, trace: ModuleTrace) -> torch.Tensor:
        """(n_rw, T, V) logits at the target positions, from the final states (B, L, d) or
        from `loss_module`."""
        if site.loss_module is None:
            return head(rows.at_targets(states))
        return lm_head(ln_f(rows.at_targets(trace.outputs[site.loss_module])))

    traced = [site.edit_module] + ([site.loss_module] if site.loss_module else [])
    traced_pass = partial(
        ModuleTrace, model, traced, retain_output=site.loss_module is not None, detach=False
    )
    optimizer = LeanAdam(shift.deltas, lr=search.lr)
    with (
        frozen_parameters(model),
        torch.enable_grad(),
        reused_outputs(model, site.reuse_outputs_of),
        BlockReplay(model, site.names, site.replay_from) as replay,
    ):
        for it in range(search.num_steps):
            optimizer.zero_grad()
            with traced_pass(edit_output=shift) as trace:
                states = replay.final_states(batch.inputs)  # (B, L, d)
            active: list[tuple[int, torch.Tensor]] = []
            for j, (rows, state) in enumerate(zip(batch.requests, progress, strict=True)):
                if state.done:
                    continue
                init = shift.initial(j)
                kl_log_probs = rows.kl_log_probs(head, states)
                if state.kl_init is None:
                    state.kl_init = kl_log_probs.detach().clone()
                nll_each, top1 = target_nll(rewrite_logits(rows, states, trace), rows)
                nll, kl, decay = _loss_terms(
                    nll_each, kl_log_probs, state.kl_init, shift.deltas[j], init, search
                )
                loss = nll + kl + decay
                state.loss = float(loss.item())
                state.prob = float(torch.exp(-nll_each).mean().item())
                if it == 0:
                    state.initial_loss, state.initial_prob = state.loss, state.prob
                log.debug("value step %d: loss %.4f = nll %.4f + kl %.4f + decay %.4f; P %.4f",
                          it, state.loss, nll, kl, decay, state.prob)  # fmt: skip
                top1 = search.early_stop_top1 and top1
                if state.loss < search.early_stop_loss or top1 or it == search.num_steps - 1:
                    state.done = True
                else:
                    active.append((j, loss))
            if not active:
                break
            torch.stack([loss for _, loss in active]).sum().backward()
            optimizer.step(j for j, _ in active)  # a stopped search keeps its delta
            for j, _ in active:
                progress[j].steps += 1
                shift.clamp_(j, search.clamp_norm_factor)
    return [
        ValueResult(
            init=shift.initial(j),
            delta=shift.deltas[j].detach().clone(),
            loss=state.loss,
            initial_loss=state.initial_loss,
            steps=state.steps,
            target_prob=state.prob,
            initial_target_prob=state.initial_prob,
        )
        for j, state in enumerate(progress)
    ]
