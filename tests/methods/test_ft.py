"""FT-L / FT-M on a tiny random GPT-2: losses by hand, training, constraint, restoration."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from pydantic import ValidationError
from transformers import GPT2LMHeadModel, PreTrainedTokenizerFast

from seqedit.methods.arch import module_names_for, rewrite_weight
from seqedit.methods.ft import (
    FT_L,
    FT_M,
    FtConfig,
    FtLConfig,
    FtMConfig,
    ft_edit,
    ft_l_loss,
    ft_m_loss,
)
from seqedit.methods.scoring import score_targets
from seqedit.methods.updates import DenseDelta, LowRankDelta, apply_update_
from seqedit.schemas.requests import EditRequest, spaced
from tests.methods.tiny import tiny_gpt2

REQUEST = EditRequest(
    case_id=0,
    prompt="{} was born in",
    subject="Fenna Underhill",
    target_new="Kyrosoft",
    target_true="Corvale",
)
LAYER = 1


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model(tokenizer: PreTrainedTokenizerFast) -> GPT2LMHeadModel:
    return tiny_gpt2(len(tokenizer))


def _ids(tokenizer: PreTrainedTokenizerFast) -> tuple[list[int], list[int]]:
    prompt = list(tokenizer(REQUEST.filled_prompt)["input_ids"])
    target = list(tokenizer(spaced(REQUEST.target_new), add_special_tokens=False)["input_ids"])
    assert len(target) >= 2, "the case should have a multi-token target"
    return prompt, target


def _hand_log_prob(row: list[float], index: int) -> float:
    """log softmax(row)[index] with explicit float arithmetic (max-shifted)."""
    top = max(row)
    return row[index] - (top + math.log(sum(math.exp(x - top) for x in row)))


@torch.no_grad()
def _objective(net: GPT2LMHeadModel, tokenizer: PreTrainedTokenizerFast, objective: str) -> float:
    prompt, target = _ids(tokenizer)
    if objective == "prompt_last":
        logits = net(input_ids=torch.tensor([prompt])).logits
        return float(ft_l_loss(logits[:, -1], torch.tensor([target])))
    joined = torch.tensor([prompt + target])
    mask = torch.tensor([[False] * len(prompt) + [True] * len(target)])
    return float(ft_m_loss(net(input_ids=joined).logits, joined, mask))


def test_ft_l_loss_equals_hand_computation(
    model: GPT2LMHeadModel, tokenizer: PreTrainedTokenizerFast
) -> None:
    prompt, target = _ids(tokenizer)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt])).logits.double()  # (1, T, V)
    last = logits[0, -1].tolist()
    expected = -sum(_hand_log_prob(last, t) for t in target) / len(target)
    got = ft_l_loss(logits[:, -1], torch.tensor([target]))
    assert float(got) == pytest.approx(expected, rel=1e-5)
    # A tiny fixed case: uniform logits give log V for any target.
    uniform = ft_l_loss(torch.zeros(2, 4), torch.tensor([[0, 3], [1, 1]]))
    assert float(uniform) == pytest.approx(math.log(4.0), rel=1e-6)


def test_ft_m_loss_equals_hand_computation(
    model: GPT2LMHeadModel, tokenizer: PreTrainedTokenizerFast
) -> None:
    prompt, target = _ids(tokenizer)
    joined = prompt + target
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([joined])).logits.double()  # (1, T+N, V)
    rows = logits[0].tolist()
    # Target token j sits at len(prompt) + j and is predicted by the row before it.
    expected = -sum(
        _hand_log_prob(rows[len(prompt) + j - 1], t) for j, t in enumerate(target)
    ) / len(target)
    mask = torch.tensor([[False] * len(prompt) + [True] * len(target)])
    got = ft_m_loss(logits, torch.tensor([joined]), mask)
    assert float(got) == pytest.approx(expected, rel=1e-5)
    # FT-M differs from FT-L: only the first target token is read at the last prompt position.
    assert float(got) != pytest.approx(
        float(ft_l_loss(logits[:, len(prompt) - 1], torch.tensor([target])))
    )


def test_dense_delta_applies_bit_for_bit_as_the_old_identity_factors() -> None:
    """Releases before edit contract v2 logged FT's dW as exact factors with an identity on
    the smaller side; applying the DenseDelta must give the same weights, bit for bit, in
    both storage layouts (so old FT campaigns replay to the same fingerprints)."""
    gen = torch.Generator().manual_seed(0)
    for shape in [(3, 5), (5, 3)]:
        dense = torch.randn(*shape, generator=gen)
        d_out, d_in = shape
        if d_out <= d_in:
            old = LowRankDelta("m", torch.eye(d_out), dense.T.contiguous())
        else:
            old = LowRankDelta("m", dense, torch.eye(d_in))
        for transposed in (False, True):
            base = torch.randn(*(shape[::-1] if transposed else shape), generator=gen)
            via_factors = apply_update_(base.clone(), old, transposed=transposed)
            via_dense = apply_update_(base.clone(), DenseDelta("m", dense), transposed=transposed)
            assert torch.equal(via_factors, via_dense)


@pytest.mark.parametrize("method", [FT_L, FT_M], ids=lambda m: m.name)
def test_ft_edit_makes_target_more_likely_and_leaves_model_unchanged(
    model: GPT2LMHeadModel, tokenizer: PreTrainedTokenizerFast, method: object
) -> None:
    config = method.config_cls(layer=LAYER, num_steps=15, lr=1e-2)  # type: ignore[attr-defined]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = [p.requires_grad for p in model.parameters()]
    result = method.edit(model, tokenizer, REQUEST, config, None)  # type: ignore[attr-defined]
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert [p.requires_grad for p in model.parameters()] == flags
    assert all(p.grad is None for p in model.parameters())

    assert 1 <= result.steps <= 15
    assert result.loss < result.initial_loss
    assert result.target_prob > result.initial_target_prob
    (delta,) = result.updates
    assert delta.module == "transformer.h.1.mlp.c_proj" and delta.shape == (32, 128)
    edited = copy.deepcopy(model)
    names = module_names_for(edited)
    apply_update_(
        rewrite_weight(edited, names, LAYER), delta, transposed=names.rewrite_weight_transposed
    )
    prompt, target = REQUEST.filled_prompt, REQUEST.target_new
    (old,) = score_targets(model, tokenizer, [prompt], [target])
    (new,) = score_targets(edited, tokenizer, [prompt], [target])
    # FT-L only trains the last prompt position: its first target token must gain; FT-M
    # trains the teacher-forced sequence: the whole target must gain.
    if config.objective == "prompt_last":
        assert new.first_token_prob > old.first_token_prob
    else:
        assert new.prob > old.prob
    objective = _objective(edited, tokenizer, config.objective)
    assert objective == pytest.approx(result.loss, rel=1e-4)
    assert objective < _objective(model, tokenizer, config.objective)


def test_norm_constraint_bounds_every_entry(
    model: GPT2LMHeadModel, tokenizer: PreTrainedTokenizerFast
) -> None:
    eps = 1e-3
    config = FtConfig(layer=LAYER, num_steps=5, lr=1e-2, norm_constraint=eps)
    result = ft_edit(model, tokenizer, REQUEST, config)
    dense = result.updates[0].dense()
    assert float(dense.abs().max()) <= eps * (1 + 1e-5)
    assert float(dense.abs().max()) >= eps * 0.99  # lr >> eps: the clamp is active


def test_delta_reproduces_the_trained_weight(
    model: GPT2LMHeadModel, tokenizer: PreTrainedTokenizerFast
) -> None:
    config = FtConfig(layer=LAYER, objective="target_new", num_steps=3, lr=1e-3)
    result = ft_edit(model, tokenizer, REQUEST, config)
    assert result.steps == 3

    # Independent reference training of a copy: same objective, Adam, same steps.
    trained = copy.deepcopy(model)
    weight = rewrite_weight(trained, module_names_for(trained), LAYER)
    weight.requires_grad_(True)
    prompt, target = _ids(tokenizer)
    joined = torch.tensor([prompt + target])
    mask = torch.tensor([[False] * len(prompt) + [True] * len(target)])
    optimizer = torch.optim.Adam([weight], lr=1e-3)
    for _ in range(3):
        optimizer.zero_grad()
        ft_m_loss(trained(input_ids=joined).logits, joined, mask).backward()
        optimizer.step()

    rebuilt = rewrite_weight(model, module_names_for(model), LAYER).detach().clone()
    apply_update_(rebuilt, result.updates[0], transposed=True)
    torch.testing.assert_close(rebuilt, weight.detach(), rtol=0, atol=1e-7)
    assert result.update_norm == pytest.approx(float(result.updates[0].dense().norm()))


def test_configs_fix_the_objective_per_method() -> None:
    assert FT_L.name == "ft-l" and FT_M.name == "ft-m"
    assert FtLConfig(layer=0).objective == "prompt_last"
    assert FtMConfig(layer=0).objective == "target_new"
    with pytest.raises(ValidationError):
        FtLConfig(layer=0, objective="target_new")
    with pytest.raises(ValidationError):
        FtConfig(layer=0, unknown=1)
    for method in (FT_L, FT_M):
        config = method.config_cls(layer=3)
        assert method.layers(config) == [3] and method.uses_second_moment(config) is False


@pytest.mark.parametrize(
    ("config_cls", "objective"), [(FtLConfig, "prompt_last"), (FtMConfig, "target_new")]
)
def test_one_sgd_step_is_a_low_rank_update(
    model: GPT2LMHeadModel, tokenizer: PreTrainedTokenizerFast, config_cls: type, objective: str
) -> None:
    """SGD moves W along its gradient: a sum of one outer product per input position (the
    loss sees every position through attention); Adam's per-entry scaling makes it dense."""
    config = config_cls(layer=0, optimizer="sgd", lr=1.0, num_steps=1, early_stop_loss=None)
    (delta,) = ft_edit(model, tokenizer, REQUEST, config).updates
    dense = delta.dense()
    prompt, target = _ids(tokenizer)
    positions = len(prompt) + (len(target) - 1 if objective == "target_new" else 0)
    assert 0 < int(torch.linalg.matrix_rank(dense.double(), rtol=1e-6)) <= positions
    adam = config.model_copy(update={"optimizer": "adam", "lr": 1e-3})
    (dense_adam,) = ft_edit(model, tokenizer, REQUEST, adam).updates
    assert (
        int(torch.linalg.matrix_rank(dense_adam.dense().double())) > positions
    )
