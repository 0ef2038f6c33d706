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
from transformers import BatchEncoding, PreTrainedModel, PreTrainedTokenizerBase

from seqedit.methods.arch import get_module
from seqedit.methods.hooks import ModuleTrace, reused_outputs
from seqedit.methods.keys_values import frozen_parameters, model_device
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


@dataclass
class _ValueBatch:
    """One value search's prompts: `n_rw` rewriting prompts, then the KL prompts (B in all).

    Attributes:
        inputs: the tokenised, padded prompts, (B, L).
        lookup: (B,) subject position of each prompt, where the delta is added.
        rows: (B,) arange(B).
        target_pos: (n_rw, T) positions whose next-token logits score the T target tokens.
        target: (n_rw, T) the target token ids.
    """

    inputs: BatchEncoding
    lookup: torch.Tensor
    rows: torch.Tensor
    target_pos: torch.Tensor
    target: torch.Tensor
    n_rw: int

    @classmethod
    def build(
        cls,
        tokenizer: PreTrainedTokenizerBase,
        request: EditRequest,
        context_templates: Sequence[str],
        search: ValueSearch,
        device: torch.device,
    ) -> _ValueBatch:
        """Rewriting prompts end with every target token but the last (teacher forcing)."""
        target_ids = tokenizer(spaced(request.target_new), add_special_tokens=False)["input_ids"]
        if not target_ids:
            raise ValueError(f"case {request.case_id}: target_new tokenizes to nothing")
        target_prefix = tokenizer.decode(target_ids[:-1])
        rewriting = [fill(ctx, request.prompt) + target_prefix for ctx in context_templates]
        prompts = [*rewriting, *search.kl_prompts]
        n_rw = len(rewriting)
        inputs = encode_batch(tokenizer, [fill(p, request.subject) for p in prompts], device)
        mask = inputs["attention_mask"]
        subjects = [request.subject] * len(prompts)
        lookup = batch_subject_positions(tokenizer, prompts, subjects, search.fact_token, mask)
        return cls(
            inputs=inputs,
            lookup=torch.tensor(lookup, device=device),
            rows=torch.arange(len(prompts), device=device),
            target_pos=last_token_positions(mask[:n_rw], len(target_ids)),
            target=torch.tensor(target_ids, device=device).expand(n_rw, len(target_ids)),
            n_rw=n_rw,
        )

    @property
    def size(self) -> int:
        return len(self.rows)

    def at_targets(self, states: torch.Tensor) -> torch.Tensor:
        """(n_rw, T, ...) of `states` (B, L, ...) at the target positions."""
        return states[self.rows[: self.n_rw, None], self.target_pos]

    def kl_log_probs(self, logits: torch.Tensor) -> torch.Tensor:
        """(n_kl, V) next-token log-probabilities at the subject of each KL prompt."""
        kl_logits = logits[self.rows[self.n_rw :], self.lookup[self.n_rw :]].float()
        return torch.log_softmax(kl_logits, dim=-1)


def _target_nll(rw_logits: torch.Tensor, batch: _ValueBatch) -> tuple[torch.Tensor, bool]:
    """Mean target-token NLL per rewriting prompt, (n_rw,), from logits (n_rw, T, V); and
    whether every target token is the argmax at its position."""
    log_probs = torch.log_softmax(rw_logits.float(), dim=-1)
    token_lp = torch.gather(log_probs, 2, batch.target.unsqueeze(2)).squeeze(2)  # (n_rw, T)
    nll_each = -token_lp.sum(dim=1) / batch.target.shape[1]
    return nll_each, bool((log_probs.argmax(-1) == batch.target).all())


class _SubjectShift:
    """`edit_output` hook of `ModuleTrace`: adds `delta` (d,) to `module`'s output
    (B, L, d) at each prompt's subject position, and keeps that output's value at the first
    prompt's subject from the first pass (`initial()`, (d,) float32)."""

    def __init__(self, module: str, batch: _ValueBatch, dim: int) -> None:
        self.module, self.batch, self.dim = module, batch, dim
        self.delta = torch.zeros(dim, device=batch.rows.device, requires_grad=True)
        self._init: torch.Tensor | None = None

    def __call__(self, name: str, out: torch.Tensor) -> torch.Tensor:
        if name != self.module:
            return out
        if self._init is None:
            self._init = out[0, self.batch.lookup[0]].detach().float().clone()
        shift = self.delta.to(out.dtype).expand(self.batch.size, self.dim)
        return out.index_put((self.batch.rows, self.batch.lookup), shift, accumulate=True)

    def initial(self) -> torch.Tensor:
        if self._init is None:
            raise RuntimeError(f"{self.module} did not run: no value to shift")
        return self._init

    def clamp_(self, factor: float) -> None:
        """Project delta into the ball of radius factor * ||initial()||."""
        max_norm = factor * self.initial().norm()
        if self.delta.norm() > max_norm:
            with torch.no_grad():
                self.delta[...] = self.delta * max_norm / self.delta.norm()


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
    makes the model predict `request.target_new` after every context template (the loss and
    the stopping rules are in the module docstring).

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
    if loss_module is not None and (ln_f_module is None or lm_head_module is None):
        raise ValueError("loss_module needs ln_f_module and lm_head_module")
    batch = _ValueBatch.build(tokenizer, request, context_templates, search, model_device(model))
    shift = _SubjectShift(edit_module, batch, dim)
    delta = shift.delta

    def rewrite_logits(logits: torch.Tensor, trace: ModuleTrace) -> torch.Tensor:
        """(n_rw, T, V) logits at the target positions, from the model or `loss_module`."""
        if loss_module is None:
            return batch.at_targets(logits)
        ln_f, lm_head = get_module(model, ln_f_module), get_module(model, lm_head_module)  # type: ignore[arg-type]
        return lm_head(ln_f(batch.at_targets(trace.outputs[loss_module])))

    traced = [edit_module] if loss_module is None else [edit_module, loss_module]
    traced_pass = partial(
        ModuleTrace, model, traced, retain_output=loss_module is not None, detach=False
    )
    optimizer = torch.optim.Adam([delta], lr=search.lr)
    kl_init: torch.Tensor | None = None
    steps = 0
    loss_value = initial_loss = prob = initial_prob = float("nan")
    with frozen_parameters(model), torch.enable_grad(), reused_outputs(model, reuse_outputs_of):
        for it in range(search.num_steps):
            optimizer.zero_grad()
            with traced_pass(edit_output=shift) as trace:
                logits = model(**batch.inputs, use_cache=False).logits  # (B, L, V)
            init = shift.initial()
            kl_log_probs = batch.kl_log_probs(logits)
            if kl_init is None:
                kl_init = kl_log_probs.detach().clone()
            nll_each, top1 = _target_nll(rewrite_logits(logits, trace), batch)
            nll, kl, decay = _loss_terms(nll_each, kl_log_probs, kl_init, delta, init, search)
            loss = nll + kl + decay
            loss_value = float(loss.item())
            prob = float(torch.exp(-nll_each).mean().item())
            if it == 0:
                initial_loss, initial_prob = loss_value, prob
            log.debug("value step %d: loss %.4f = nll %.4f + kl %.4f + decay %.4f; P %.4f",
                      it, loss_value, nll.item(), kl.item(), decay.item(), prob)  # fmt: skip
            top1 = search.early_stop_top1 and top1
            if loss_value < search.early_stop_loss or top1 or it == search.num_steps - 1:
                break
            loss.backward()
            optimizer.step()
            steps += 1
            shift.clamp_(search.clamp_norm_factor)
    return ValueResult(
        init=shift.initial(),
        delta=delta.detach().clone(),
        loss=loss_value,
        initial_loss=initial_loss,
        steps=steps,
        target_prob=prob,
        initial_target_prob=initial_prob,
    )
