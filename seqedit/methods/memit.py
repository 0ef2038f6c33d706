"""MEMIT: mass-editing memory in a transformer (Meng et al., 2023).

For a batch of n requests and layers L_1 < ... < L_m (rewrite module W_l: (d_out, d_in)):
  z_j   = residual (block output) of the LAST layer L_m at request j's subject token plus an
          optimised shift (`optimize_values` with the loss read at v_loss_layer through
          ln_f + lm_head);
  for l = L_1 .. L_m, on the model already carrying the updates of the earlier layers:
    K   = (d_in, n) keys: module inputs at the subject, averaged within each context-template
          group and then across groups (reference `compute_ks`);
    R   = (z - h_{L_m}) / (m - i), h read at the bare prompt;
    dW  = R K^T (lambda C + K K^T)^-1, lambda = mom2_update_weight, solved in float64.
Each dW is stored as LowRankDelta(left=R (d_out, n), right=(lambda C + K K^T)^-1 K (d_in, n)).
Reference: kmeng01/memit `memit/memit_main.py`, `compute_z.py`, `compute_ks.py`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import NamedTuple

import torch
from pydantic import Field, model_validator
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from seqedit.methods.arch import ModuleNames, rewrite_dims, rewrite_weight
from seqedit.methods.config import ValueSearchOptions, names_for
from seqedit.methods.context import BARE_TEMPLATE, context_templates_for
from seqedit.methods.keys_values import (
    keys_and_bare_outputs,
    model_device,
    restored_tensors,
)
from seqedit.methods.method import (
    Derived,
    EditMethod,
    Footprint,
    HparamsImport,
    low_rank_step,
    one_at_a_time,
    rewrite_modules,
)
from seqedit.methods.tokens import EncodingMemo, FactToken
from seqedit.methods.updates import EditResult, LowRankDelta, apply_update_
from seqedit.methods.value_search import KL_PROMPTS, ValueResult, ValueSearch, optimize_values
from seqedit.schemas.requests import EditRequest

log = logging.getLogger(__name__)

TemplateGroups = list[list[str]]
"""Context templates in groups (reference layout): [["{}"], ["<text>. {}", ...], ...]."""


class LayeredEditConfig(ValueSearchOptions):
    """Fields shared by MEMIT and AlphaEdit (reference names, gpt2-xl values as defaults)."""

    layers: list[int] = Field(
        min_length=1, description="Blocks whose MLP output projection is edited, ascending."
    )
    fact_token: FactToken = Field(
        default="subject_last", description="Token where keys are read and z is inserted."
    )
    v_num_grad_steps: int = Field(
        default=20, ge=1, description="Forward passes of the z optimisation (steps <= this - 1)."
    )
    v_lr: float = Field(default=0.5, gt=0, description="Adam learning rate of the z shift.")
    v_loss_layer: int = Field(
        description="Block whose output, through ln_f and lm_head, gives the z loss "
        "(max(v_loss_layer, last edited layer) is used)."
    )
    v_weight_decay: float = Field(
        default=0.5, ge=0, description="Weight of ||delta|| / ||z_init||^2 in the z loss."
    )
    clamp_norm_factor: float = Field(
        default=0.75, gt=0, description="The z shift is kept within this factor times ||z_init||."
    )
    kl_factor: float = Field(
        default=0.0625, ge=0, description="Weight of the KL term on the '{} is a' prompt."
    )
    mom2_adjustment: bool = Field(
        default=True, description="Reference field; the covariance is always used."
    )
    context_template_length_params: list[tuple[int, int]] = Field(
        default_factory=lambda: [(10, 5)],
        description="(length in tokens incl. the start token, count) of sampled prefixes; each "
        "pair is one template group.",
    )
    context_templates: list[list[str]] | None = Field(
        default=None,
        description="Fixed template groups (each template with one '{}'); overrides sampling. "
        "The bare group ['{}'] is put first.",
    )
    context_seed: int = Field(default=0, description="Seed for sampling context templates.")
    early_stop_loss: float = Field(
        default=5e-2, ge=0, description="z optimisation stops once the loss is below this."
    )
    kl_prompts: list[str] = Field(
        default_factory=lambda: list(KL_PROMPTS),
        description="Templates ('{}' = subject) whose next-token distribution must not move.",
    )

    @model_validator(mode="after")
    def _check(self) -> LayeredEditConfig:
        if list(self.layers) != sorted(set(self.layers)):
            raise ValueError(f"layers must be strictly ascending: {self.layers}")
        groups = self.context_templates or []
        for template in [*(t for g in groups for t in g), *self.kl_prompts]:
            if template.count("{}") != 1:
                raise ValueError(f"template must contain exactly one '{{}}': {template!r}")
        return self


class MemitConfig(LayeredEditConfig):
    """MEMIT hyperparameters."""

    mom2_update_weight: float = Field(
        default=20000.0, ge=0, description="lambda in (lambda C + K K^T): weight of preservation."
    )


def memit_context_templates(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, config: LayeredEditConfig
) -> TemplateGroups:
    """Template groups: [["{}"], *config groups] when fixed, else one sampled group per pair.

    Sampling uses `context.py` (start token, top-k, `context_seed`), not the reference's
    `generate_fast` from the prefixes "The", "Therefore", ...: pin templates to reproduce it.
    """
    if config.context_templates is not None:
        groups = [[t for t in g if t != BARE_TEMPLATE] for g in config.context_templates]
        return [[BARE_TEMPLATE], *(g for g in groups if g)]
    groups: TemplateGroups = [[BARE_TEMPLATE]]
    for pair in config.context_template_length_params:
        sampled = context_templates_for(
            model, tokenizer, fixed=None, length_params=[pair], seed=config.context_seed
        )
        groups.append(sampled[1:])
    return groups


def compute_targets(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    requests: Sequence[EditRequest],
    config: LayeredEditConfig,
    groups: TemplateGroups,
    names: ModuleNames,
) -> list[ValueResult]:
    """z of each request (reference `compute_z`): `ValueResult.target` is (d_model,)."""
    z_layer = config.layers[-1]
    d_model = rewrite_dims(model, names, z_layer)[1]
    loss_layer = max(config.v_loss_layer, z_layer)
    flat = [t for g in groups for t in g]
    reuse = config.reuse_lower_layers  # the shift is added to block z_layer's output
    return optimize_values(
        model,
        tokenizer,
        requests,
        flat,
        names=names,
        edit_module=names.layer_module_tmp.format(z_layer),
        dim=d_model,
        search=ValueSearch.of(config),
        loss_module=names.layer_module_tmp.format(loss_layer),
        reuse_outputs_of=[names.layer_module_tmp.format(z_layer)] if reuse else [],
        replay_from=z_layer if reuse else None,
    )


@contextmanager
def restored_weights(
    model: PreTrainedModel, names: ModuleNames, layers: Sequence[int]
) -> Iterator[None]:
    """Snapshot the rewrite weights of `layers`; copy them back on exit (even on error)."""
    with restored_tensors([rewrite_weight(model, names, layer) for layer in layers]):
        yield


LayerSolver = Callable[[int, int, torch.Tensor, torch.Tensor], torch.Tensor]
"""(index i, layer, keys K (d_in, n), residual R (d_out, n)) -> right factor (d_in, n)
such that dW = R @ right^T."""


class LayeredUpdate(NamedTuple):
    """Deltas of one layered update and the keys they were built from."""

    deltas: list[LowRankDelta]
    keys: dict[int, torch.Tensor]  # layer -> (n, d_in)
    residual_norms: dict[int, float]  # layer -> mean ||z - h|| before its update


def apply_layered_updates(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    requests: Sequence[EditRequest],
    config: LayeredEditConfig,
    groups: TemplateGroups,
    zs: torch.Tensor,
    solve: LayerSolver,
    names: ModuleNames,
) -> LayeredUpdate:
    """Layer by layer: keys, residual R = (z - h)/(remaining layers), dW = R right^T, APPLIED.

    Args:
        zs: (n, d_model) targets at the last edited layer's block output.
    The model keeps every update on return: wrap the call in `restored_weights`.
    """
    z_module = names.layer_module_tmp.format(config.layers[-1])
    deltas: list[LowRankDelta] = []
    keys: dict[int, torch.Tensor] = {}
    norms: dict[int, float] = {}
    encodings = EncodingMemo(tokenizer, model_device(model))  # the same texts at every layer
    for i, layer in enumerate(config.layers):
        module = names.rewrite_module_tmp.format(layer)
        k, current = keys_and_bare_outputs(
            model, tokenizer, requests, (module, z_module), groups, config.fact_token, encodings
        )
        targets = (zs - current).T.double()  # (d_out, n)
        norms[layer] = float(targets.norm(dim=0).mean())
        resid = targets / (len(config.layers) - i)
        right = solve(i, layer, k.T, resid).to(resid.dtype)
        delta = LowRankDelta(module=module, left=resid, right=right)
        apply_update_(
            rewrite_weight(model, names, layer), delta, transposed=names.rewrite_weight_transposed
        )
        deltas.append(delta)
        keys[layer] = k
        log.debug("layer %d: z error %.4g, ||dW|| %.4g", layer, norms[layer], delta.norm())
    return LayeredUpdate(deltas, keys, norms)


def batch_result(
    update: LayeredUpdate, values: Sequence[ValueResult], zs: torch.Tensor
) -> EditResult:
    """EditResult of a batch: key = first layer's keys (n, d_in), value = zs (n, d_model);
    losses and probabilities are means over requests, steps the total."""

    def mean(xs: Sequence[float]) -> float:
        return float(sum(xs) / len(xs))

    first = min(update.keys)
    return EditResult(
        updates=list(update.deltas),
        loss=mean([v.loss for v in values]),
        steps=sum(v.steps for v in values),
        key=update.keys[first],
        value=zs,
        initial_loss=mean([v.initial_loss for v in values]),
        initial_target_prob=mean([v.initial_target_prob for v in values]),
        target_prob=mean([v.target_prob for v in values]),
        value_shift_norm=mean([float(v.delta.norm()) for v in values]),
        update_norm=sum(d.norm() for d in update.deltas),
        extras={f"z_error.layer{k}": v for k, v in update.residual_norms.items()},
    )


def memit_right_factor(
    second_moment: torch.Tensor, keys: torch.Tensor, weight: float
) -> torch.Tensor:
    """(d_in, n) float64 (weight C + K K^T)^-1 K for C (d_in, d_in), K (d_in, n)."""
    k = keys.double()
    system = weight * second_moment.double() + k @ k.T
    return torch.linalg.solve(system, k)


def memit_deltas(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    requests: list[EditRequest],
    config: MemitConfig,
    *,
    second_moments: dict[int, torch.Tensor],
    context_templates: TemplateGroups,
    names: ModuleNames | None = None,
) -> EditResult:
    """Compute (not apply) MEMIT's deltas for a batch; the model is left unchanged.

    Args:
        second_moments: layer -> (d_in, d_in) C of that layer's rewrite module input.
        context_templates: template groups, the first being ["{}"] (`memit_context_templates`).
    Returns one LowRankDelta per layer (left (d_out, n) float64, right (d_in, n) float64),
    key = first layer's keys (n, d_in), value = z (n, d_model).
    """
    if not requests:
        raise ValueError("memit_deltas needs at least one request")
    if not context_templates or context_templates[0] != [BARE_TEMPLATE]:
        raise ValueError(f"first template group must be ['{{}}']: {context_templates[:1]}")
    missing = [layer for layer in config.layers if layer not in second_moments]
    if missing:
        raise ValueError(f"MEMIT needs the second moment of layers {missing}")
    if model.training:
        log.warning("memit_deltas on a model in training mode: dropout makes keys noisy")
    names = names or names_for(model, config)
    values = compute_targets(model, tokenizer, requests, config, context_templates, names)
    zs = torch.stack([v.target for v in values])  # (n, d_model)

    def solve(_i: int, layer: int, keys: torch.Tensor, _resid: torch.Tensor) -> torch.Tensor:
        return memit_right_factor(second_moments[layer], keys, config.mom2_update_weight)

    with restored_weights(model, names, config.layers):
        update = apply_layered_updates(
            model, tokenizer, requests, config, context_templates, zs, solve, names
        )
    result = batch_result(update, values, zs)
    log.info(
        "MEMIT batch of %d at layers %s: loss %.4f -> %.4f, ||dW|| %.4g",
        len(requests),
        config.layers,
        result.initial_loss,
        result.loss,
        result.update_norm,
    )
    return result


class MemitContext(NamedTuple):
    """What MEMIT computes once per campaign: template groups and C of each edited layer."""

    templates: TemplateGroups
    second_moments: dict[int, torch.Tensor]  # layer -> (d_in, d_in)


def _prepare(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    config: MemitConfig,
    second_moments: dict[int, torch.Tensor] | None,
    _derived: Derived | None = None,
    /,
) -> MemitContext:
    missing = [layer for layer in config.layers if layer not in (second_moments or {})]
    if missing:
        raise ValueError(f"MEMIT needs the covariance of layers {missing}")
    assert second_moments is not None
    moments = {layer: second_moments[layer] for layer in config.layers}
    return MemitContext(memit_context_templates(model, tokenizer, config), moments)


def memit_batch(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    requests: list[EditRequest],
    config: MemitConfig,
    context: MemitContext,
) -> EditResult:
    """MEMIT on a batch with a prepared context (the model is left unchanged)."""
    return memit_deltas(
        model,
        tokenizer,
        requests,
        config,
        second_moments=context.second_moments,
        context_templates=context.templates,
    )


def _modules(config: MemitConfig, names: ModuleNames, _n_layers: int) -> list[str]:
    return rewrite_modules(list(config.layers), names)


TESTBED_LAYERS: dict[str, object] = {
    "layers": [0, 1],
    "v_loss_layer": 3,
    "context_templates": [["{}"]],
}
"""MEMIT/AlphaEdit on the synthetic-300 testbed: z at block 1, so two attention layers carry
it (with their own lambda / L2, scaled to this model's keys)."""

MEMIT = EditMethod(
    name="memit",
    version="1",
    config_cls=MemitConfig,
    layers=lambda config: list(config.layers),
    modules=_modules,
    uses_second_moment=lambda config: True,
    prepare=_prepare,
    edit=one_at_a_time(memit_batch),
    edit_batch=memit_batch,
    footprint=Footprint(step=low_rank_step(_modules, torch.float64)),  # resid and solve: f64
    hparams_import=HparamsImport(easyedit_alg="MEMIT", path_names=("MEMIT",)),
    quick_hparams={"layers": [0], "v_loss_layer": 3, "context_templates": [["{}"]]},
    testbed_hparams={**TESTBED_LAYERS, "mom2_update_weight": 1000.0},
)
