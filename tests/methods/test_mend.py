"""MEND's network and its update, checked by hand against autograd on a tiny GPT-2."""

from __future__ import annotations

import pytest
import torch
from transformers import GPT2LMHeadModel, PreTrainedTokenizerFast

from seqedit.methods.arch import module_names_for, module_weight
from seqedit.methods.mend import (
    EditExample,
    GradientTransform,
    MendEditor,
    MendNetworkConfig,
    Moments,
    RunningStandardiser,
    default_mend_modules,
    mend_updates,
    token_factors,
    weight_shapes,
)
from seqedit.methods.mend_loss import MendLossConfig, mend_loss
from seqedit.methods.updates import apply_update_
from seqedit.schemas.requests import LocalityPrompt
from tests.methods.tiny import BORN_IN, tiny_gpt2

REQUEST = BORN_IN


@pytest.fixture(scope="module")
def model(tokenizer: PreTrainedTokenizerFast) -> GPT2LMHeadModel:
    return tiny_gpt2(len(tokenizer))


def _editor(model: GPT2LMHeadModel, edit_lr: float = 0.1) -> MendEditor:
    names = module_names_for(model)
    modules = default_mend_modules(names, model.config.n_layer, last=2)
    shapes = weight_shapes(model, modules, names.rewrite_weight_transposed)
    return MendEditor(modules, shapes, MendNetworkConfig(rank=4, edit_lr=edit_lr)).eval()


def test_untrained_mend_is_a_gradient_step_times_its_edit_lr(
    model: GPT2LMHeadModel, tokenizer: PreTrainedTokenizerFast
) -> None:
    """Hand check: identity-initialised and without statistics, MEND's update of every map
    is -lr times the gradient of the edit example's NLL with respect to that weight."""
    editor = _editor(model, edit_lr=0.1)
    with torch.no_grad():
        editor.edit_lrs.copy_(torch.tensor([0.1, 0.2, 0.3, 0.4]))  # one rate per map
    names = module_names_for(model)
    updates = mend_updates(model, tokenizer, REQUEST, editor)
    assert all(p.grad is None for p in model.parameters())  # no parameter gradient taken

    example = EditExample.of(tokenizer, REQUEST, torch.device("cpu"))
    weights = [
        module_weight(model, m, names.rewrite_weight_transposed)[0] for m in editor.modules_edited
    ]
    for weight in weights:
        weight.requires_grad_(True)
    try:
        loss = example.nll(model(input_ids=example.input_ids).logits)
        grads = torch.autograd.grad(loss, weights)
    finally:
        for weight in weights:
            weight.requires_grad_(False)
    n_tokens = example.input_ids.shape[1]
    for i, (update, grad) in enumerate(zip(updates, grads, strict=True)):
        by_math = grad.T if names.rewrite_weight_transposed else grad  # (d_out, d_in)
        expected = -editor.edit_lrs[i].detach() * by_math
        assert update.module == editor.modules_edited[i]
        assert update.rank == n_tokens  # one rank-one term per token
        torch.testing.assert_close(update.dense(), expected, rtol=1e-5, atol=1e-7)
        assert float(expected.abs().max()) > 1e-4  # the check is not of zeros


def test_applied_update_lowers_the_edit_loss(
    model: GPT2LMHeadModel, tokenizer: PreTrainedTokenizerFast
) -> None:
    editor = _editor(model, edit_lr=0.05)
    names = module_names_for(model)
    example = EditExample.of(tokenizer, REQUEST, torch.device("cpu"))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    try:
        with torch.no_grad():
            before = float(example.nll(model(input_ids=example.input_ids).logits))
            for update in mend_updates(model, tokenizer, REQUEST, editor):
                weight = module_weight(model, update.module, names.rewrite_weight_transposed)[0]
                apply_update_(weight, update, transposed=names.rewrite_weight_transposed)
            after = float(example.nll(model(input_ids=example.input_ids).logits))
    finally:
        model.load_state_dict(state)
    assert after < before


def test_running_standardiser_matches_mean_and_std() -> None:
    rows = torch.randn(50, 6, generator=torch.Generator().manual_seed(0)) * 3 + 1
    standardiser = RunningStandardiser(6)
    assert torch.equal(standardiser(rows), rows)  # nothing seen yet: unchanged
    standardiser.add(Moments.of(rows[:20]))
    standardiser.add(Moments.of(rows[20:23]).merged(Moments.of(rows[23:])))
    assert int(standardiser.count) == 50
    torch.testing.assert_close(standardiser.mean, rows.mean(0))
    expected = (rows - rows.mean(0)) / (rows.std(0) + 1e-7)
    torch.testing.assert_close(standardiser(rows), expected, rtol=1e-5, atol=1e-5)


def test_forward_passes_never_add_statistics() -> None:
    config = MendNetworkConfig(rank=2, n_hidden=1)
    transform = GradientTransform(3, 2, 1, config).train()
    u, delta = torch.randn(5, 3), torch.randn(5, 2)
    same_u, same_delta = transform(u, delta, 0)
    assert torch.equal(same_u, u) and torch.equal(same_delta, delta)  # identity at init
    assert int(transform.standardiser.count) == 0


def test_editor_moments_group_rows_by_shape(model: GPT2LMHeadModel) -> None:
    editor = _editor(model)
    factors = [(torch.randn(4, d_in), torch.randn(4, d_out)) for d_out, d_in in editor.shapes]
    moments = editor.moments(factors)
    assert {k: m.count for k, m in moments.items()} == {"128x32": 8, "32x128": 8}
    editor.add_moments(moments)
    assert int(editor.transforms["128x32"].standardiser.count) == 8


def test_update_is_differentiable_in_the_network(
    model: GPT2LMHeadModel, tokenizer: PreTrainedTokenizerFast
) -> None:
    """Training backpropagates a loss of the update into every block and the edit rates."""
    editor = _editor(model)
    u, delta = torch.randn(7, 32), torch.randn(7, 128)
    i = next(k for k, s in enumerate(editor.shapes) if s == (128, 32))
    update = editor.update(i, u, delta)
    (update.dense() ** 2).sum().backward()
    assert editor.edit_lrs.grad is not None and float(editor.edit_lrs.grad[i].abs()) > 0
    transform = editor.transforms["128x32"]
    assert all(b.up.grad is not None for b in transform.blocks)


def test_maps_of_one_shape_share_a_transform(model: GPT2LMHeadModel) -> None:
    editor = _editor(model)
    assert sorted(editor.transforms) == ["128x32", "32x128"]  # c_fc, c_proj of 2 blocks
    assert editor.map_index == [0, 0, 1, 1]
    with pytest.raises(ValueError, match="one shape per module"):
        MendEditor(["a"], [], MendNetworkConfig())


TRAIN_REQUEST = REQUEST.model_copy(
    update={
        "paraphrase_prompts": ["Helka Tillman works for Fenna Underhill, who was born in"],
        "neighborhood_prompts": [
            LocalityPrompt(prompt="Kelvin Everly was born in", target="Corvale")
        ],
    }
)


def test_loss_without_an_update_has_no_locality_term(
    model: GPT2LMHeadModel, tokenizer: PreTrainedTokenizerFast
) -> None:
    editor = _editor(model)
    with torch.no_grad():
        editor.edit_lrs.zero_()
    names = module_names_for(model)
    loss, metrics = mend_loss(
        model, tokenizer, TRAIN_REQUEST, editor, MendLossConfig(),
        transposed=names.rewrite_weight_transposed,
    )  # fmt: skip
    assert metrics["loss/loc"] == pytest.approx(0.0, abs=1e-6)
    assert metrics["nll/pre"] == pytest.approx(metrics["nll/post"], abs=1e-6)
    assert float(loss.detach()) == pytest.approx(0.1 * metrics["loss/edit"], rel=1e-6)


def test_training_steps_lower_the_loss(
    model: GPT2LMHeadModel, tokenizer: PreTrainedTokenizerFast
) -> None:
    """A few Adam steps on one request lower MEND's loss: the gradient reaches the network
    and the edit rates through the functional forward."""
    torch.manual_seed(0)
    editor = _editor(model, edit_lr=0.5).train()
    names = module_names_for(model)
    optimiser = torch.optim.Adam(editor.parameters(), lr=5e-2)
    weights = MendLossConfig(c_edit=1.0, c_loc=1.0)
    losses = []
    example = EditExample.of(tokenizer, TRAIN_REQUEST, torch.device("cpu"))
    for _ in range(15):
        factors = token_factors(model, example, editor.modules_edited)
        editor.add_moments(editor.moments(factors))  # as the trainer does, before the loss
        loss, _ = mend_loss(
            model, tokenizer, TRAIN_REQUEST, editor, weights,
            transposed=names.rewrite_weight_transposed, factors=factors,
        )  # fmt: skip
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        losses.append(float(loss.detach()))
    assert all(p.grad is None for p in model.parameters())
    assert losses[-1] < losses[0] - 0.2, losses  # constant if no gradient reached the editor
