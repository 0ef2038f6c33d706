"""FT-L and FT-M: constrained fine-tuning of one rewrite module (Zhu et al., 2020; EasyEdit).

For one request, the weight W of the rewrite module of layer L (the MLP output projection,
the same module ROME edits) is trained with Adam from its current value, every other
parameter frozen:
  FT-L ("prompt_last"): logits at the LAST prompt token only; every target token is scored
        at that one position, loss = -mean_j log p(t_j | prompt). Not autoregressive.
  FT-M ("target_new"): teacher-forced cross-entropy over prompt + target, masked to the
        target span (the standard LM objective).
After each step W is clamped entrywise to [W0 - eps, W0 + eps] when `norm_constraint` is set.
A step is skipped, and training stops, once the loss is below `early_stop_loss`.

Departures from EasyEdit's `ft_main.py`, on purpose:
  * only the module's `.weight` is trained (EasyEdit trains every parameter whose name
    contains the module name, the bias included);
  * prompt and target are tokenised separately and concatenated (as `scoring` does), so the
    target's tokens never depend on the prompt; EasyEdit tokenises the joined text for FT-M;
  * one request per edit (no batching across requests).

The model is restored before returning; the update comes back as a `DenseDelta` (an Adam
update clamped entrywise is full rank in general: factors would save nothing).
"""

from __future__ import annotations

import logging
import math
from typing import ClassVar, Literal

import torch
from pydantic import Field
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from seqedit.methods.arch import ModuleNames, rewrite_weight
from seqedit.methods.config import MethodConfig, names_for
from seqedit.methods.keys_values import frozen_parameters, model_device
from seqedit.methods.method import (
    Derived,
    EditMethod,
    Footprint,
    HparamsImport,
    edited_shapes,
    empty,
    rewrite_modules,
)
from seqedit.methods.updates import DenseDelta, EditResult, Update
from seqedit.schemas.requests import EditRequest, spaced

log = logging.getLogger(__name__)

FtObjective = Literal["prompt_last", "target_new"]


class FtConfig(MethodConfig):
    """Fine-tuning hyperparameters (EasyEdit field names; its gpt2-xl values as defaults)."""

    step_budget_fields: ClassVar[tuple[str, ...]] = ("num_steps",)

    layer: int = Field(
        ge=0,
        description="Index of the block whose rewrite module (MLP output projection) is trained.",
    )
    objective: FtObjective = Field(
        default="prompt_last",
        description="'prompt_last' (FT-L: all target tokens scored at the last prompt token) or "
        "'target_new' (FT-M: teacher-forced cross-entropy on the target span).",
    )
    num_steps: int = Field(default=25, ge=1, description="Budget of optimiser steps.")
    lr: float = Field(default=5e-4, gt=0, description="Learning rate.")
    weight_decay: float = Field(default=0.0, ge=0, description="Optimiser weight decay.")
    optimizer: Literal["adam", "sgd"] = Field(
        default="adam",
        description="'adam' (EasyEdit) moves every weight entry by about lr per step, a dense "
        "change; 'sgd' follows the gradient, a sum of one outer product per input token, so "
        "sequential edits disturb each other less (needs a much larger lr).",
    )
    norm_constraint: float | None = Field(
        default=None,
        gt=0,
        description="eps: after every step each weight entry is clamped to within +-eps of its "
        "value before the edit; None disables the clamp (EasyEdit's gpt2-xl file uses 5e-4).",
    )
    early_stop_loss: float | None = Field(
        default=1e-2,
        ge=0,
        description="No step is taken and training stops once the loss is below this "
        "(EasyEdit hard-codes 1e-2); None always runs num_steps steps.",
    )


class FtLConfig(FtConfig):
    """FT-L: the objective is fixed to 'prompt_last'."""

    objective: Literal["prompt_last"] = Field(
        default="prompt_last", description="Fixed for FT-L: logits at the last prompt token."
    )


class FtMConfig(FtConfig):
    """FT-M: the objective is fixed to 'target_new'."""

    objective: Literal["target_new"] = Field(
        default="target_new", description="Fixed for FT-M: teacher-forced CE on the target span."
    )


def ft_l_loss(logits_last: torch.Tensor, target_ids: torch.Tensor) -> torch.Tensor:
    """FT-L loss: -mean_j log p(t_j | prompt), every t_j read at the last prompt position.

    Args:
        logits_last: (B, V) logits at each row's last prompt token.
        target_ids: (B, N) target token ids (one request: no padding).

    Returns the scalar mean over rows of the per-row mean negative log-probability.
    """
    log_probs = torch.log_softmax(logits_last.float(), dim=-1)  # (B, V)
    picked = torch.gather(log_probs, 1, target_ids)  # (B, N)
    return -picked.mean(dim=1).mean()


def ft_m_loss(
    logits: torch.Tensor, input_ids: torch.Tensor, target_mask: torch.Tensor
) -> torch.Tensor:
    """FT-M loss: teacher-forced cross-entropy of prompt + target, masked to the target span.

    Args:
        logits: (B, T, V) logits over the joined prompt + target tokens.
        input_ids: (B, T) the joined tokens; logits[:, t] predicts input_ids[:, t + 1].
        target_mask: (B, T) True at target tokens (position 0 must be False).

    Returns the scalar mean over rows of the per-row mean NLL of the target tokens.
    """
    log_probs = torch.log_softmax(logits[:, :-1].float(), dim=-1)  # (B, T-1, V)
    labels = input_ids[:, 1:]  # (B, T-1)
    mask = target_mask[:, 1:].to(log_probs.dtype)  # (B, T-1)
    nll = -torch.gather(log_probs, 2, labels.unsqueeze(-1)).squeeze(-1)  # (B, T-1)
    return ((nll * mask).sum(dim=1) / mask.sum(dim=1)).mean()


class _Batch:
    """Token tensors of one request for one objective (all on the model's device)."""

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        request: EditRequest,
        objective: FtObjective,
        device: torch.device,
    ) -> None:
        prompt_ids = list(tokenizer(request.filled_prompt)["input_ids"])
        target_ids = list(
            tokenizer(spaced(request.target_new), add_special_tokens=False)["input_ids"]
        )
        if not prompt_ids or not target_ids:
            raise ValueError(f"case {request.case_id}: empty tokenisation of prompt or target")
        self.objective = objective
        self.target_ids = torch.tensor([target_ids], device=device)  # (1, N)
        if objective == "prompt_last":
            self.input_ids = torch.tensor([prompt_ids], device=device)  # (1, T)
            self.target_mask = torch.zeros_like(self.input_ids, dtype=torch.bool)
        else:
            self.input_ids = torch.tensor([prompt_ids + target_ids], device=device)  # (1, T+N)
            self.target_mask = torch.zeros_like(self.input_ids, dtype=torch.bool)
            self.target_mask[:, len(prompt_ids) :] = True

    def loss(self, model: PreTrainedModel) -> torch.Tensor:
        """The objective's scalar loss under the model's current weights."""
        logits = model(input_ids=self.input_ids).logits  # (1, T, V)
        if self.objective == "prompt_last":
            return ft_l_loss(logits[:, -1], self.target_ids)
        return ft_m_loss(logits, self.input_ids, self.target_mask)


_OPTIMIZERS: dict[str, type[torch.optim.Optimizer]] = {
    "adam": torch.optim.Adam,
    "sgd": torch.optim.SGD,
}


def ft_edit(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    request: EditRequest,
    config: FtConfig,
    *,
    names: ModuleNames | None = None,
) -> EditResult:
    """Compute (not apply) the fine-tuning delta for `request`; the model is left unchanged.

    The rewrite weight is trained in place and restored (also on error). Returns an
    EditResult with one DenseDelta on the rewrite module (dW = W_trained - W0 in the
    (d_out, d_in) convention, float32), loss = the objective after training, steps = Adam
    steps taken, target_prob = exp(-loss) (per-token geometric mean for the objective's
    scoring); key and value are empty (FT has neither).
    """
    if model.training:
        log.warning("ft_edit on a model in training mode: dropout makes the loss noisy")
    names = names or names_for(model, config)
    module = names.rewrite_module_tmp.format(config.layer)
    weight = rewrite_weight(model, names, config.layer)
    batch = _Batch(tokenizer, request, config.objective, model_device(model))
    original = weight.detach().clone()
    eps = config.norm_constraint
    initial_loss = math.nan
    steps = 0
    try:
        with frozen_parameters(model):
            weight.requires_grad_(True)
            optimizer = _OPTIMIZERS[config.optimizer](
                [weight], lr=config.lr, weight_decay=config.weight_decay
            )
            for _ in range(config.num_steps):
                optimizer.zero_grad(set_to_none=True)
                loss = batch.loss(model)
                value = float(loss.detach())
                if math.isnan(initial_loss):
                    initial_loss = value
                if config.early_stop_loss is not None and value < config.early_stop_loss:
                    break
                loss.backward()
                optimizer.step()
                steps += 1
                if eps is not None:
                    with torch.no_grad():
                        weight.copy_(torch.clamp(weight, min=original - eps, max=original + eps))
            with torch.no_grad():
                final_loss = float(batch.loss(model))
            stored = (weight.detach().float() - original.float()).clone()  # storage layout
    finally:
        with torch.no_grad():
            weight.copy_(original)
        weight.grad = None
    delta_w = stored.T if names.rewrite_weight_transposed else stored  # (d_out, d_in)
    delta = DenseDelta(module, delta_w.contiguous())
    result = EditResult(
        updates=[delta],
        loss=final_loss,
        steps=steps,
        key=torch.empty(0),
        value=torch.empty(0),
        initial_loss=initial_loss,
        initial_target_prob=math.exp(-initial_loss),
        target_prob=math.exp(-final_loss),
        update_norm=float(delta_w.norm()),
        extras={"max_abs_update": float(delta_w.abs().max())},
    )
    log.info(
        "FT (%s) case %d at %s: loss %.4f -> %.4f in %d steps, ||dW|| %.4g, max|dW| %.3g",
        config.objective,
        request.case_id,
        module,
        initial_loss,
        final_loss,
        steps,
        result.update_norm,
        result.extras["max_abs_update"],
    )
    return result


def _prepare(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    config: FtConfig,
    second_moments: dict[int, torch.Tensor] | None,
    _derived: Derived | None = None,
    /,
) -> None:
    return None


def _edit(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    request: EditRequest,
    config: FtConfig,
    context: None,
) -> EditResult:
    return ft_edit(model, tokenizer, request, config)


def _modules(config: FtConfig, names: ModuleNames, _n_layers: int) -> list[str]:
    return rewrite_modules([config.layer], names)


def _step(model: PreTrainedModel, config: FtConfig, _n: int) -> list[Update]:
    """One float32 (d_out, d_in) dense delta (the difference of float32 weights)."""
    return [
        DenseDelta(module, empty(model, shape, torch.float32))
        for module, shape in edited_shapes(model, config, _modules).items()
    ]


def _import(objective: str, path_names: tuple[str, ...]) -> HparamsImport:
    """EasyEdit's FT files name the objective; the reference's FT (kmeng01) is FT-L."""
    return HparamsImport(
        easyedit_alg="FT",
        selector=("objective_optimization", objective),
        path_names=path_names,
        renamed={"layers": "layer", "objective_optimization": "objective"},
        dropped={
            "kl_factor": "read by no FT code (EasyEdit's or the reference's)",
            "wd_power_law": "null in the source: no weight-decay scaling (other values are "
            "refused)",
        },
        null_only=("wd_power_law",),
        false_means={"norm_constraint": None, "weight_decay": 0.0},
    )


_QUICK = {"layer": 0, "lr": 1e-2, "num_steps": 10}
_TESTBED = {"layer": 3, "optimizer": "sgd", "lr": 5.0, "num_steps": 100, "early_stop_loss": 0.5}


def _ft_method(name: str, config_cls: type[FtConfig], imports: HparamsImport) -> EditMethod:
    """FT-L and FT-M differ only in their config (its fixed objective)."""
    return EditMethod(
        name=name,
        version="1",
        config_cls=config_cls,
        layers=lambda config: [config.layer],
        modules=_modules,
        uses_second_moment=lambda config: False,
        prepare=_prepare,
        edit=_edit,
        footprint=Footprint(step=_step),
        hparams_import=imports,
        quick_hparams=dict(_QUICK),
        testbed_hparams=dict(_TESTBED),
    )


FT_L = _ft_method("ft-l", FtLConfig, _import("prompt_last", ("FT", "FT-L")))
FT_M = _ft_method("ft-m", FtMConfig, _import("target_new", ("FT-M",)))
