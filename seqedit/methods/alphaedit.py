"""AlphaEdit: null-space constrained knowledge editing (Fang et al., ICLR 2025).

MEMIT's z, keys and layer-by-layer residuals (see `memit.py`), with a different update per
layer l (math convention W: (d_out, d_in), K: (d_in, n), R: (d_out, n)):
  P   = U0 U0^T, U0 = eigenvectors of C with eigenvalue < nullspace_threshold (absolute);
  A   = P (K K^T + cache_c) + L2 * I                            (d_in, d_in)
  dW  = R (A^-1 P K)^T      i.e. the reference's storage-layout dW^T = A^-1 P K R^T.
Since dW = (...) P^T-free rows times P K, dW k = 0 for every k with P k = 0, i.e. outputs on
the preserved keys (C's large-eigenvalue directions) are unchanged.
After all layers are updated, the keys of the batch are recomputed on the edited model and
cache_c += K K^T per layer: cache_c is SEQUENTIAL STATE, kept by the caller (and checkpointed
with the model). Reference: jianghoucheng/AlphaEdit `AlphaEdit/AlphaEdit_main.py`,
`experiments/evaluate.py:get_project` (float32 throughout, `torch.linalg.solve`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal

import torch
from pydantic import Field
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from seqedit.methods.arch import ModuleNames, rewrite_dims
from seqedit.methods.config import names_for
from seqedit.methods.context import BARE_TEMPLATE
from seqedit.methods.memit import (
    TESTBED_LAYERS,
    LayeredEditConfig,
    TemplateGroups,
    apply_layered_updates,
    batch_result,
    compute_targets,
    memit_context_templates,
    restored_weights,
)
from seqedit.methods.method import (
    Derived,
    EditMethod,
    Footprint,
    HparamsImport,
    SequentialState,
    edited_shapes,
    empty,
    low_rank_step,
    one_at_a_time,
    rewrite_modules,
)
from seqedit.methods.updates import EditResult
from seqedit.schemas.requests import EditRequest

log = logging.getLogger(__name__)

_DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "float64": torch.float64}


class AlphaEditConfig(LayeredEditConfig):
    """AlphaEdit hyperparameters (MEMIT's, plus the null-space ones)."""

    nullspace_threshold: float = Field(
        default=2e-2,
        ge=0,
        description="Eigenvalues of C below this (absolute) span the null space P projects onto.",
    )
    L2: float = Field(default=10.0, ge=0, description="Ridge term L2 * I in the update's system.")
    solve_dtype: Literal["float32", "float64"] = Field(
        default="float32",
        description="dtype of the update's linear solve (the reference uses float32).",
    )


def null_space_projector(second_moment: torch.Tensor, threshold: float) -> torch.Tensor:
    """(d_in, d_in) P = U0 U0^T, U0 the eigenvectors of C (d_in, d_in) with eigenvalue < threshold.

    Computed with `torch.linalg.svd` in C's dtype as the reference does (for a symmetric PSD C
    the singular vectors are its eigenvectors); returned in C's dtype.
    """
    u, s, _ = torch.linalg.svd(second_moment, full_matrices=False)
    null = u[:, s < threshold]  # (d_in, r0)
    return null @ null.T


NULL_BASIS, RANGE_BASIS, PROJECTOR = "null_basis", "range_basis", "projector"


def null_space_basis(second_moment: torch.Tensor, threshold: float) -> dict[str, torch.Tensor]:
    """The smaller of the two orthonormal bases that define P, for caching.

    With U0 (d_in, r0) the eigenvectors of C below `threshold` and U1 (d_in, d_in - r0) the
    rest: {"null_basis": U0} when r0 <= d_in / 2, else {"range_basis": U1} (P = I - U1 U1^T).
    Same SVD as `null_space_projector`.
    """
    u, s, _ = torch.linalg.svd(second_moment, full_matrices=False)
    null = s < threshold
    if int(null.sum()) * 2 <= len(s):
        return {NULL_BASIS: u[:, null].contiguous()}
    return {RANGE_BASIS: u[:, ~null].contiguous()}


def projector_from_basis(basis: dict[str, torch.Tensor]) -> torch.Tensor:
    """(d_in, d_in) P from `null_space_basis`: U0 U0^T, or I - U1 U1^T; or P itself when
    the entry is {"projector": P} (a projector the reference code saved, imported by
    `seqedit stats import --projector`)."""
    if PROJECTOR in basis:
        return basis[PROJECTOR]
    if NULL_BASIS in basis:
        null = basis[NULL_BASIS]
        return null @ null.T
    span = basis[RANGE_BASIS]
    return torch.eye(span.shape[0], dtype=span.dtype, device=span.device) - span @ span.T


def alphaedit_right_factor(
    projector: torch.Tensor,
    cache_c: torch.Tensor,
    keys: torch.Tensor,
    l2: float,
    dtype: torch.dtype,
) -> torch.Tensor:
    """(d_in, n) A^-1 P K with A = P (K K^T + cache_c) + l2 I.

    Shapes: P and cache_c (d_in, d_in), K (d_in, n). Solved in `dtype`.
    """
    p, c, k = projector.to(dtype), cache_c.to(dtype), keys.to(dtype)
    eye = torch.eye(k.shape[0], dtype=dtype, device=k.device)
    system = p @ (k @ k.T + c) + l2 * eye
    return torch.linalg.solve(system, p @ k)


def alphaedit_deltas(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    requests: list[EditRequest],
    config: AlphaEditConfig,
    *,
    projectors: dict[int, torch.Tensor],
    cache_c: dict[int, torch.Tensor],
    context_templates: TemplateGroups,
    names: ModuleNames | None = None,
) -> tuple[EditResult, dict[int, torch.Tensor]]:
    """Compute (not apply) AlphaEdit's deltas for a batch, and the next cache_c.

    Args:
        projectors: layer -> (d_in, d_in) P (`null_space_projector`).
        cache_c: layer -> (d_in, d_in) sum of K K^T of all earlier edits (zeros at the start);
            not modified.
        context_templates: template groups, the first being ["{}"].
    Returns (result, new cache_c): one LowRankDelta per layer (left R (d_out, n) float64,
    right A^-1 P K (d_in, n)); new cache_c[l] = cache_c[l] + K' K'^T with K' the keys on
    the model carrying this batch's deltas (the reference recomputes them; they are the
    keys of the update itself, see below). The new cache is only valid if the
    caller applies the returned deltas. The model is left unchanged.
    """
    if not requests:
        raise ValueError("alphaedit_deltas needs at least one request")
    if not context_templates or context_templates[0] != [BARE_TEMPLATE]:
        raise ValueError(f"first template group must be ['{{}}']: {context_templates[:1]}")
    missing = [x for x in config.layers if x not in projectors or x not in cache_c]
    if missing:
        raise ValueError(f"AlphaEdit needs P and cache_c of layers {missing}")
    names = names or names_for(model, config)
    dtype = _DTYPES[config.solve_dtype]
    values = compute_targets(model, tokenizer, requests, config, context_templates, names)
    zs = torch.stack([v.target for v in values])  # (n, d_model)

    def solve(_i: int, layer: int, keys: torch.Tensor, _resid: torch.Tensor) -> torch.Tensor:
        return alphaedit_right_factor(projectors[layer], cache_c[layer], keys, config.L2, dtype)

    new_cache: dict[int, torch.Tensor] = {}
    with restored_weights(model, names, config.layers):
        update = apply_layered_updates(
            model, tokenizer, requests, config, context_templates, zs, solve, names
        )
    # K' of a layer on the model carrying all of the batch's deltas is the K its update was
    # built from: that update was computed on the model carrying the lower layers' deltas,
    # and neither its own delta nor the higher ones reach the input of its rewrite module
    for layer in config.layers:
        k = update.keys[layer].to(cache_c[layer])  # (n, d_in)
        new_cache[layer] = cache_c[layer] + k.T @ k
    result = batch_result(update, values, zs)
    log.info(
        "AlphaEdit batch of %d at layers %s: loss %.4f -> %.4f, ||dW|| %.4g",
        len(requests),
        config.layers,
        result.initial_loss,
        result.loss,
        result.update_norm,
    )
    return result, new_cache


@dataclass
class AlphaEditContext:
    """Per-campaign AlphaEdit state. `cache_c` is the SEQUENTIAL state: `_edit` replaces it
    after every edit (assuming the editor applies the returned deltas); checkpoint it with
    the model, and restore it together with the weights on rollback.

    Attributes:
        templates: template groups.
        projectors: layer -> (d_in, d_in) P.
        cache_c: layer -> (d_in, d_in) accumulated K K^T of all edits so far.
    """

    templates: TemplateGroups
    projectors: dict[int, torch.Tensor]
    cache_c: dict[int, torch.Tensor]


def _prepare(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    config: AlphaEditConfig,
    second_moments: dict[int, torch.Tensor] | None,
    derived: Derived | None = None,
    /,
) -> AlphaEditContext:
    """P per layer from the (cached) basis, else from C; cache_c starts at zero."""
    derived = derived or {}
    moments = second_moments or {}
    missing = [x for x in config.layers if x not in derived and x not in moments]
    if missing:
        raise ValueError(f"AlphaEdit needs the covariance of layers {missing}")
    names = names_for(model, config)
    projectors = {
        layer: projector_from_basis(
            derived[layer] if layer in derived else _derive(config, moments[layer])
        )
        for layer in config.layers
    }
    cache = {}
    for layer in config.layers:
        d_in = rewrite_dims(model, names, layer)[0]
        cache[layer] = torch.zeros(d_in, d_in, dtype=projectors[layer].dtype)
    return AlphaEditContext(memit_context_templates(model, tokenizer, config), projectors, cache)


def alphaedit_batch(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    requests: list[EditRequest],
    config: AlphaEditConfig,
    context: AlphaEditContext,
) -> EditResult:
    """AlphaEdit on a batch; updates `context.cache_c` (the model is left unchanged)."""
    result, context.cache_c = alphaedit_deltas(
        model,
        tokenizer,
        requests,
        config,
        projectors=context.projectors,
        cache_c=context.cache_c,
        context_templates=context.templates,
    )
    return result


_CACHE = "cache_c."


def _derive(config: AlphaEditConfig, second_moment: torch.Tensor) -> dict[str, torch.Tensor]:
    return null_space_basis(second_moment, config.nullspace_threshold)


def _state(context: AlphaEditContext) -> SequentialState:
    """{"cache_c.<layer>": (d_in, d_in)} copies of the accumulated K K^T."""
    return {f"{_CACHE}{layer}": c.clone() for layer, c in context.cache_c.items()}


def _load_state(context: AlphaEditContext, state: SequentialState) -> None:
    """Replace `context.cache_c` by a saved state of the same layers and shapes."""
    expected = set(_state(context))
    if set(state) != expected:
        raise ValueError(f"AlphaEdit state needs {sorted(expected)}, got {sorted(state)}")
    cache = {}
    for layer, current in context.cache_c.items():
        saved = state[f"{_CACHE}{layer}"]
        if saved.shape != current.shape:
            raise ValueError(
                f"AlphaEdit cache_c of layer {layer}: shape {tuple(saved.shape)}, "
                f"expected {tuple(current.shape)}"
            )
        cache[layer] = saved.to(current).clone()
    context.cache_c = cache


def _modules(config: AlphaEditConfig, names: ModuleNames, _n_layers: int) -> list[str]:
    return rewrite_modules(list(config.layers), names)


def _state_after(model: PreTrainedModel, config: AlphaEditConfig, _edits: int) -> SequentialState:
    """cache_c of every layer, (d_in, d_in) in the covariance's dtype as the editor loads it
    (float32), whatever the number of edits."""
    shapes = edited_shapes(model, config, _modules)
    return {
        f"{_CACHE}{layer}": empty(model, (d_in, d_in), torch.float32)
        for layer, (_, d_in) in zip(config.layers, shapes.values(), strict=True)
    }


ALPHAEDIT = EditMethod(
    name="alphaedit",
    version="1",
    config_cls=AlphaEditConfig,
    layers=lambda config: list(config.layers),
    modules=_modules,
    uses_second_moment=lambda config: True,
    prepare=_prepare,
    edit=one_at_a_time(alphaedit_batch),
    edit_batch=alphaedit_batch,
    state=_state,
    load_state=_load_state,
    derive=_derive,
    derive_key=lambda config: {"nullspace_threshold": config.nullspace_threshold},
    footprint=Footprint(  # factors in float64 (resid; the solve cast to it)
        step=low_rank_step(_modules, torch.float64), state=_state_after
    ),
    hparams_import=HparamsImport(
        easyedit_alg="AlphaEdit",
        path_names=("AlphaEdit",),
        dropped={
            "mom2_update_weight": "read by no AlphaEdit code: preservation is the null-space "
            "projection (nullspace_threshold) and L2",
        },
    ),
    quick_hparams={"layers": [0], "v_loss_layer": 3, "context_templates": [["{}"]]},
    testbed_hparams={**TESTBED_LAYERS, "L2": 0.5},
)
