"""MEMIT and AlphaEdit on a tiny random GPT-2 and on random matrices: algebraic properties.

- MEMIT's update solves its least-squares problem: dW = argmin ||dW K - R||^2 + lambda
  tr(dW C dW^T), i.e. the normal equations dW (K K^T + lambda C) = R K^T hold.
- AlphaEdit leaves outputs on preserved keys unchanged: dW k = 0 for every k in the span of
  C's eigenvectors whose eigenvalue is >= nullspace_threshold.
- Both leave the model unchanged, return one low-rank delta per layer, and AlphaEdit's
  cache_c grows by K K^T of the batch.
"""

from __future__ import annotations

import pytest
import torch
from transformers import GPT2LMHeadModel, PreTrainedTokenizerFast

from seqedit.methods.alphaedit import (
    ALPHAEDIT,
    AlphaEditConfig,
    alphaedit_deltas,
    alphaedit_right_factor,
    null_space_projector,
)
from seqedit.methods.arch import module_names_for, rewrite_weight
from seqedit.methods.memit import MEMIT, MemitConfig, memit_deltas, memit_right_factor
from seqedit.schemas.requests import EditRequest
from tests.methods.tiny import tiny_gpt2

GROUPS = [["{}"], ["The city lies in the north. {}", "In the evenings. {}"]]
REQUESTS = [
    EditRequest(
        case_id=0, prompt="{} was born in", subject="Fenna Underhill", target_new="Kyrosoft"
    ),
    EditRequest(case_id=1, prompt="{} works for", subject="Helka Tillman", target_new="Corvale"),
]
LAYERS = [0, 1]
D_IN = 128
THRESHOLD = 0.5


@pytest.fixture(scope="module")
def model(tokenizer: PreTrainedTokenizerFast) -> GPT2LMHeadModel:
    return tiny_gpt2(len(tokenizer), n_layer=3)


def _spectrum_moment(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(C (D_IN, D_IN), U_keep (D_IN, D_IN/2)): half the eigenvalues >= THRESHOLD, half below."""
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(D_IN, D_IN, generator=gen, dtype=torch.float64))
    half = D_IN // 2
    big = THRESHOLD * (1.5 + 10 * torch.rand(half, generator=gen, dtype=torch.float64))
    small = THRESHOLD * 0.5 * torch.rand(D_IN - half, generator=gen, dtype=torch.float64)
    c = q @ torch.diag(torch.cat([big, small])) @ q.T
    return c.float(), q[:, :half]


def test_memit_right_factor_solves_normal_equations() -> None:
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(D_IN, D_IN, generator=gen, dtype=torch.float64)
    c = a @ a.T / D_IN + 1e-2 * torch.eye(D_IN, dtype=torch.float64)
    k = torch.randn(D_IN, 7, generator=gen, dtype=torch.float64)
    r = torch.randn(16, 7, generator=gen, dtype=torch.float64)
    lam = 50.0
    dw = r @ memit_right_factor(c, k, lam).T  # (16, D_IN)
    gradient = (dw @ k - r) @ k.T + lam * dw @ c  # d/d(dW) of the objective / 2
    assert gradient.abs().max() <= 1e-9 * (r @ k.T).abs().max()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_alphaedit_update_vanishes_on_preserved_keys(dtype: torch.dtype) -> None:
    c, keep = _spectrum_moment(1)
    p = null_space_projector(c, THRESHOLD)
    assert int(torch.linalg.matrix_rank(p)) == D_IN // 2
    gen = torch.Generator().manual_seed(2)
    k = torch.randn(D_IN, 5, generator=gen)
    prev = torch.randn(D_IN, 9, generator=gen)
    r = torch.randn(32, 5, generator=gen)
    right = alphaedit_right_factor(p, prev @ prev.T, k, 1.0, dtype)
    dw = r.to(dtype) @ right.T  # (32, D_IN)
    w = torch.randn(32, D_IN, generator=gen).to(dtype)
    preserved = (keep @ torch.randn(D_IN // 2, 20, dtype=torch.float64)).to(dtype)
    ratio = (dw @ preserved).norm(dim=0) / (w @ preserved).norm(dim=0)
    assert ratio.max() <= 1e-4
    assert (dw @ k.to(dtype)).norm() > 1e-3 * (w @ k.to(dtype)).norm()  # the edit does act


def _moments(model: GPT2LMHeadModel) -> dict[int, torch.Tensor]:
    return {layer: _spectrum_moment(10 + layer)[0] for layer in LAYERS}


def test_memit_deltas_least_squares_and_model_unchanged(
    model: GPT2LMHeadModel, tokenizer: PreTrainedTokenizerFast
) -> None:
    names = module_names_for(model)
    config = MemitConfig(
        layers=LAYERS,
        v_loss_layer=2,
        v_num_grad_steps=4,
        mom2_update_weight=10.0,
        context_templates=GROUPS,
    )
    before = {layer: rewrite_weight(model, names, layer).clone() for layer in LAYERS}
    moments = _moments(model)
    result = memit_deltas(
        model, tokenizer, REQUESTS, config, second_moments=moments, context_templates=GROUPS
    )
    for layer in LAYERS:
        assert torch.equal(rewrite_weight(model, names, layer), before[layer])
    assert [d.module for d in result.updates] == [
        names.rewrite_module_tmp.format(layer) for layer in LAYERS
    ]
    assert all(d.rank == len(REQUESTS) for d in result.updates)
    assert result.key.shape == (len(REQUESTS), D_IN) and result.value.shape == (2, 32)
    first = result.updates[0]  # built from result.key on the unedited model
    k, r, c = result.key.T.double(), first.left, moments[LAYERS[0]].double()
    dw = first.dense()
    lhs = dw @ (k @ k.T + config.mom2_update_weight * c)
    assert (lhs - r @ k.T).abs().max() <= 1e-8 * (r @ k.T).abs().max()


def test_alphaedit_deltas_preserve_keys_and_grow_cache(
    model: GPT2LMHeadModel, tokenizer: PreTrainedTokenizerFast
) -> None:
    names = module_names_for(model)
    config = AlphaEditConfig(
        layers=LAYERS,
        v_loss_layer=2,
        v_num_grad_steps=4,
        nullspace_threshold=THRESHOLD,
        L2=1.0,
        context_templates=GROUPS,
    )
    moments = _moments(model)
    projectors = {layer: null_space_projector(c, THRESHOLD) for layer, c in moments.items()}
    cache = {layer: torch.zeros(D_IN, D_IN) for layer in LAYERS}
    before = {layer: rewrite_weight(model, names, layer).clone() for layer in LAYERS}
    result, new_cache = alphaedit_deltas(
        model,
        tokenizer,
        REQUESTS,
        config,
        projectors=projectors,
        cache_c=cache,
        context_templates=GROUPS,
    )
    for layer, delta in zip(LAYERS, result.updates, strict=True):
        assert torch.equal(rewrite_weight(model, names, layer), before[layer])
        assert torch.equal(cache[layer], torch.zeros(D_IN, D_IN))  # input not mutated
        keep = _spectrum_moment(10 + layer)[1].float()  # (D_IN, D_IN/2)
        w = before[layer].T  # (d_out, d_in)
        ratio = (delta.dense().float() @ keep).norm(dim=0) / (w @ keep).norm(dim=0)
        assert ratio.max() <= 1e-4
        grown = new_cache[layer]
        assert torch.allclose(grown, grown.T, atol=1e-5)
        assert int(torch.linalg.matrix_rank(grown.double(), atol=1e-6)) == len(REQUESTS)


def test_methods_edit_one_request_and_keep_sequential_state(
    model: GPT2LMHeadModel, tokenizer: PreTrainedTokenizerFast
) -> None:
    moments = _moments(model)
    memit_config = MemitConfig(
        layers=LAYERS, v_loss_layer=2, v_num_grad_steps=2, context_templates=GROUPS
    )
    context = MEMIT.prepare(model, tokenizer, memit_config, moments)
    result = MEMIT.edit(model, tokenizer, REQUESTS[0], memit_config, context)
    assert result.key.shape == (D_IN,) and all(d.rank == 1 for d in result.updates)

    ae_config = AlphaEditConfig(
        layers=LAYERS,
        v_loss_layer=2,
        v_num_grad_steps=2,
        nullspace_threshold=THRESHOLD,
        context_templates=GROUPS,
    )
    state = ALPHAEDIT.prepare(model, tokenizer, ae_config, moments)
    assert all(float(c.abs().sum()) == 0.0 for c in state.cache_c.values())
    ALPHAEDIT.edit(model, tokenizer, REQUESTS[0], ae_config, state)
    assert all(float(c.abs().sum()) > 0.0 for c in state.cache_c.values())
