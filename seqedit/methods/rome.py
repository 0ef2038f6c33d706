"""ROME: rank-one model editing of one MLP output projection (Meng et al., 2022).

For one request at layer L, with W the (d_out, d_in) map of the rewrite module:
  k*  = input of the module at the subject's last token, averaged over context templates;
  u   = C^-1 k* (C = uncentred second moment of the module input) or k* without
        mom2_adjustment, normalised to unit length;
  v*  = output of the MLP at the subject plus an optimised shift (see `optimize_values`);
  dW  = (v* - W k) u^T / (u^T k).
In the ORIGINAL code the k in the last line (denominator and W k, read as the module's
output, bias included) is the key of the bare prompt, not k*: the two keys are mixed.
r-ROME (Gupta et al., 2024) uses k* there too (and the template-averaged output for W k),
which removes the "disabling edits" whose update norm explodes; set `rrome=True`.
"""

from __future__ import annotations

import logging
from typing import NamedTuple

import torch
from pydantic import Field, model_validator
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from seqedit.methods.arch import ModuleNames, rewrite_dims
from seqedit.methods.config import ValueSearchOptions, names_for
from seqedit.methods.context import BARE_TEMPLATE, context_templates_for
from seqedit.methods.keys_values import module_io_at_subjects
from seqedit.methods.method import (
    Derived,
    EditMethod,
    Footprint,
    HparamsImport,
    low_rank_step,
    rewrite_modules,
)
from seqedit.methods.tokens import FactToken, fill
from seqedit.methods.updates import EditResult, LowRankDelta
from seqedit.methods.value_search import KL_PROMPTS, ValueSearch, optimize_values
from seqedit.schemas.requests import EditRequest

log = logging.getLogger(__name__)


class RomeConfig(ValueSearchOptions):
    """ROME hyperparameters (reference field names; gpt2-xl reference values as defaults)."""

    layer: int = Field(
        ge=0, description="Index of the block whose MLP output projection is edited."
    )
    fact_token: FactToken = Field(
        default="subject_last", description="Token where the key is read and the value inserted."
    )
    v_num_grad_steps: int = Field(
        default=20,
        ge=1,
        description="Forward passes of the value optimisation (steps = this - 1 at most).",
    )
    v_lr: float = Field(default=0.5, gt=0, description="Adam learning rate of the value shift.")
    v_loss_layer: int | None = Field(
        default=None,
        description="Reference field, unused by ROME: its loss is read from the final logits.",
    )
    v_weight_decay: float = Field(
        default=0.5, ge=0, description="Weight of ||delta|| / ||v_init||^2 in the value loss."
    )
    clamp_norm_factor: float = Field(
        default=4.0,
        gt=0,
        description="The value shift is kept within this factor times ||v_init||.",
    )
    kl_factor: float = Field(
        default=0.0625, ge=0, description="Weight of the KL term on the '{} is a' prompt."
    )
    mom2_adjustment: bool = Field(
        default=True, description="u = C^-1 k* (paper); False uses u = k* (EasyEdit's default)."
    )
    context_template_length_params: list[tuple[int, int]] = Field(
        default_factory=lambda: [(5, 10), (10, 10)],
        description="(length in tokens incl. the start token, count) of sampled context prefixes.",
    )
    context_templates: list[str] | None = Field(
        default=None,
        description="Fixed context templates (each with one '{}'); overrides sampling.",
    )
    context_seed: int = Field(default=0, description="Seed for sampling context templates.")
    early_stop_loss: float = Field(
        default=5e-2, ge=0, description="Value optimisation stops once the loss is below this."
    )
    kl_prompts: list[str] = Field(
        default_factory=lambda: list(KL_PROMPTS),
        description="Templates ('{}' = subject) whose next-token distribution must not move.",
    )
    rrome: bool = Field(
        default=False,
        description="r-ROME: use the template-averaged key (and output) in the update, not the "
        "bare-prompt key.",
    )

    @model_validator(mode="after")
    def _templates_have_placeholder(self) -> RomeConfig:
        for template in [*(self.context_templates or []), *self.kl_prompts]:
            if template.count("{}") != 1:
                raise ValueError(f"template must contain exactly one '{{}}': {template!r}")
        return self


class RankOneUpdate(NamedTuple):
    """dW = left ⊗ right in the (d_out, d_in) convention."""

    left: torch.Tensor  # (d_out,)
    right: torch.Tensor  # (d_in,) the unit vector u
    denominator: torch.Tensor  # () u^T k_update


def invert_second_moment(
    second_moment: torch.Tensor, *, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """(d_in, d_in) C^-1 with `torch.inverse`, returned in C's dtype.

    By default the inverse is computed in C's own dtype, as the reference does (float32).
    C is often ill-conditioned (cond ~1e5), so a float32 inverse carries ~1e-4 relative
    error that even depends on the CPU thread count; `dtype=torch.float64` is more accurate
    but departs from the reference. Callers editing many times should invert once and pass
    the inverse to `rome_edit`.
    """
    work = second_moment if dtype is None else second_moment.to(dtype)
    return torch.inverse(work).to(second_moment.dtype)


def rome_update_from_kv(
    weight: torch.Tensor | None,
    c_inv: torch.Tensor | None,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    key_update: torch.Tensor | None = None,
    out_current: torch.Tensor | None = None,
) -> RankOneUpdate:
    """The ROME rank-one update that maps `key_update` to `value`.

    Args:
        weight: (d_out, d_in) W in the math convention; only read when out_current is None.
        c_inv: (d_in, d_in) inverse second moment, or None for u = key.
        key: (d_in,) k*, which sets the direction u = C^-1 k* / ||C^-1 k*||.
        value: (d_out,) v*.
        key_update: (d_in,) key that must map to v* (default `key`).
        out_current: (d_out,) current module output at key_update (default W @ key_update;
            pass the measured output when the module has a bias).

    Then (W + left right^T) key_update = out_current + (v* - out_current) = v*.
    """
    k_upd = key if key_update is None else key_update
    u = key if c_inv is None else (c_inv.to(key) @ key.unsqueeze(1)).squeeze(1)
    u = u / u.norm()
    if out_current is None:
        if weight is None:
            raise ValueError("rome_update_from_kv needs weight or out_current")
        out_current = weight.to(k_upd) @ k_upd
    denominator = torch.dot(k_upd, u)
    return RankOneUpdate(left=(value - out_current) / denominator, right=u, denominator=denominator)


def rome_context_templates(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, config: RomeConfig
) -> list[str]:
    """The config's fixed templates, or templates sampled with `config.context_seed`."""
    return context_templates_for(
        model,
        tokenizer,
        fixed=config.context_templates,
        length_params=config.context_template_length_params,
        seed=config.context_seed,
    )


def _inverse_for(
    config: RomeConfig,
    second_moment: torch.Tensor | None,
    inv_second_moment: torch.Tensor | None,
) -> torch.Tensor | None:
    """(d_in, d_in) C^-1 for mom2_adjustment (the precomputed one first), else None."""
    if not config.mom2_adjustment:
        return None
    if inv_second_moment is not None:
        return inv_second_moment
    if second_moment is None:
        raise ValueError("mom2_adjustment=True needs second_moment or inv_second_moment")
    return invert_second_moment(second_moment)


def rome_edit(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    request: EditRequest,
    config: RomeConfig,
    *,
    second_moment: torch.Tensor | None,
    context_templates: list[str],
    inv_second_moment: torch.Tensor | None = None,
    names: ModuleNames | None = None,
) -> EditResult:
    """Compute (not apply) the ROME delta for `request`; the model is left unchanged.

    Args:
        second_moment: (d_in, d_in) C of the rewrite module's input; inverted here with
            `torch.inverse` unless `inv_second_moment` is given. Unused without mom2_adjustment.
        context_templates: templates for key averaging and the value loss; the first must be
            "{}" (see `rome_context_templates`).
        inv_second_moment: (d_in, d_in) precomputed C^-1 (takes precedence over second_moment).
        names: module names (default: by `model.config.model_type`).

    Returns an EditResult with one rank-one LowRankDelta on `<rewrite module>` (the parameter
    is its `.weight`), key = k* (d_in,), value = v* (d_out,).
    """
    if not context_templates or context_templates[0] != BARE_TEMPLATE:
        raise ValueError(
            f"context_templates must start with {BARE_TEMPLATE!r}: {context_templates[:2]}"
        )
    if model.training:
        log.warning("rome_edit on a model in training mode: dropout makes keys and values noisy")
    names = names or names_for(model, config)
    module = names.rewrite_module_tmp.format(config.layer)
    c_inv = _inverse_for(config, second_moment, inv_second_moment)
    _, d_out = rewrite_dims(model, names, config.layer)
    subject = request.subject

    # k*: the module input at the subject, averaged over the context templates.
    prompts = [fill(ctx, request.prompt) for ctx in context_templates]
    keys, outs = module_io_at_subjects(
        model, tokenizer, prompts, [subject] * len(prompts), module, config.fact_token
    )  # (n_ctx, d_in), (n_ctx, d_out)
    key = keys.mean(dim=0)

    # after the first pass only the edited block and those above run, and in the edited
    # block the attention and the MLP return their first output: the shift is added to the
    # MLP's output, so neither can change
    reuse = config.reuse_lower_layers
    (value,) = optimize_values(
        *(model, tokenizer, [request], context_templates),
        names=names,
        edit_module=names.mlp_module_tmp.format(config.layer),
        dim=d_out,
        search=ValueSearch.of(config),
        reuse_outputs_of=[
            names.attn_module_tmp.format(config.layer),
            names.mlp_module_tmp.format(config.layer),
        ] if reuse else [],
        replay_from=config.layer if reuse else None,
    )  # fmt: skip
    target = value.target

    if config.rrome:
        key_update, out_current = key, outs.mean(dim=0)
    else:  # original: key and output at the bare prompt (the first template is "{}"; the
        # reference reads them from a forward of their own, equal to float rounding)
        key_update, out_current = keys[0], outs[0]  # (d_in,), (d_out,)
    update = rome_update_from_kv(
        None, c_inv, key, target, key_update=key_update, out_current=out_current
    )
    delta = LowRankDelta(
        module=module, left=update.left.unsqueeze(1), right=update.right.unsqueeze(1)
    )
    result = EditResult(
        updates=[delta],
        loss=value.loss,
        steps=value.steps,
        key=key,
        value=target.detach(),
        initial_loss=value.initial_loss,
        initial_target_prob=value.initial_target_prob,
        target_prob=value.target_prob,
        value_shift_norm=float(value.delta.norm()),
        update_norm=delta.norm(),
        denominator=float(update.denominator),
    )
    log.info("ROME case %d at %s: loss %.4f -> %.4f in %d steps, P(target) %.4f -> %.4f, "
             "||dW|| %.4g", request.case_id, module, result.initial_loss, result.loss,
             result.steps, result.initial_target_prob, result.target_prob,
             result.update_norm)  # fmt: skip
    return result


class RomeContext(NamedTuple):
    """What ROME computes once per campaign: templates and C^-1 of the edited layer."""

    templates: list[str]
    inv_second_moment: torch.Tensor | None  # (d_in, d_in)


def _prepare(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    config: RomeConfig,
    second_moments: dict[int, torch.Tensor] | None,
    derived: Derived | None = None,
    /,
) -> RomeContext:
    inverse = None
    if config.mom2_adjustment:
        if derived and config.layer in derived:
            inverse = derived[config.layer][_INVERSE]
        elif second_moments and config.layer in second_moments:
            inverse = _derive(config, second_moments[config.layer])[_INVERSE]
        else:
            raise ValueError(
                f"ROME with mom2_adjustment needs the covariance of layer {config.layer}"
            )
    return RomeContext(rome_context_templates(model, tokenizer, config), inverse)


_INVERSE = "inverse"


def _derive(config: RomeConfig, second_moment: torch.Tensor) -> dict[str, torch.Tensor]:
    """{"inverse": C^-1 (d_in, d_in)}, as `invert_second_moment` computes it."""
    return {_INVERSE: invert_second_moment(second_moment)}


def _edit(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    request: EditRequest,
    config: RomeConfig,
    context: RomeContext,
) -> EditResult:
    return rome_edit(
        model,
        tokenizer,
        request,
        config,
        second_moment=None,
        context_templates=context.templates,
        inv_second_moment=context.inv_second_moment,
    )


def _modules(config: RomeConfig, names: ModuleNames, _n_layers: int) -> list[str]:
    return rewrite_modules([config.layer], names)


ROME = EditMethod(
    name="rome",
    version="1",
    config_cls=RomeConfig,
    layers=lambda config: [config.layer],
    modules=_modules,
    uses_second_moment=lambda config: config.mom2_adjustment,
    prepare=_prepare,
    edit=_edit,
    derive=_derive,
    footprint=Footprint(step=low_rank_step(_modules, torch.float32)),  # rank 1, float32
    hparams_import=HparamsImport(
        easyedit_alg="ROME",
        path_names=("ROME",),
        renamed={"layers": "layer"},
        one_layer_hint=" (or import the file as memit)",
    ),
    quick_hparams={"layer": 0, "context_templates": ["{}"]},
    testbed_hparams={"layer": 0, "context_templates": ["{}"]},
)
