"""ROME and its shared ops on a tiny random GPT-2: algebraic and behavioural properties."""

from __future__ import annotations

import pytest
import torch
from transformers import GPT2LMHeadModel, PreTrainedTokenizerFast

from seqedit.methods.arch import get_module, module_names_for, rewrite_weight
from seqedit.methods.context import generate_context_templates, normalize_templates
from seqedit.methods.hooks import ModuleTrace
from seqedit.methods.keys_values import module_io_at_subjects
from seqedit.methods.rome import RomeConfig, rome_edit, rome_update_from_kv
from seqedit.methods.tokens import (
    EncodingMemo,
    batch_subject_positions,
    encode_at_subjects,
    encode_batch,
    subject_index,
)
from seqedit.methods.updates import LowRankDelta, apply_update_
from seqedit.schemas.requests import EditRequest
from tests.methods.tiny import tiny_gpt2

TEMPLATES = ["{}", "The city lies in the north. {}", "In the evenings. {}"]
REQUEST = EditRequest(
    case_id=0,
    prompt="{} was born in",
    subject="Fenna Underhill",
    target_new="Kyrosoft",
    target_true="Corvale",
)
LAYER = 1


@pytest.fixture(scope="module")
def model(tokenizer: PreTrainedTokenizerFast) -> GPT2LMHeadModel:
    return tiny_gpt2(len(tokenizer))


@pytest.fixture(scope="module")
def second_moment() -> torch.Tensor:
    gen = torch.Generator().manual_seed(1)
    a = torch.randn(128, 128, generator=gen)
    return a @ a.T / 128 + 0.1 * torch.eye(128)


def _config(**overrides: object) -> RomeConfig:
    return RomeConfig(layer=LAYER, v_num_grad_steps=4, context_templates=TEMPLATES, **overrides)


def _module_out_at_prompt(
    model: GPT2LMHeadModel, tokenizer: PreTrainedTokenizerFast
) -> torch.Tensor:
    module = module_names_for(model).rewrite_module_tmp.format(LAYER)
    _, outs = module_io_at_subjects(
        model, tokenizer, [REQUEST.prompt], [REQUEST.subject], module, "subject_last"
    )
    return outs[0]


def test_update_from_kv_maps_key_to_value() -> None:
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(8, 12, generator=gen, dtype=torch.float64)
    a = torch.randn(12, 12, generator=gen, dtype=torch.float64)
    c_inv = torch.inverse(a @ a.T + torch.eye(12, dtype=torch.float64))
    k, k_raw = (
        torch.randn(12, generator=gen, dtype=torch.float64),
        torch.randn(12, generator=gen, dtype=torch.float64),
    )
    v = torch.randn(8, generator=gen, dtype=torch.float64)
    for inv, k_upd in [(None, None), (c_inv, None), (c_inv, k_raw)]:
        upd = rome_update_from_kv(w, inv, k, v, key_update=k_upd)
        new_w = w + torch.outer(upd.left, upd.right)
        target_key = k if k_upd is None else k_upd
        torch.testing.assert_close(new_w @ target_key, v)
        direction = k if inv is None else inv @ k
        torch.testing.assert_close(upd.right, direction / direction.norm())


def test_rome_edit_is_rank_one_and_maps_prompt_key_to_value(
    model: GPT2LMHeadModel, tokenizer: PreTrainedTokenizerFast, second_moment: torch.Tensor
) -> None:
    result = rome_edit(
        model,
        tokenizer,
        REQUEST,
        _config(),
        second_moment=second_moment,
        context_templates=TEMPLATES,
    )
    (delta,) = result.updates
    assert delta.rank == 1 and delta.shape == (32, 128)
    assert int(torch.linalg.matrix_rank(delta.dense())) == 1
    assert delta.norm() == pytest.approx(float(delta.dense().norm()), rel=1e-5)
    assert result.steps <= 3 and result.key.shape == (128,) and result.value.shape == (32,)
    names = module_names_for(model)
    weight = rewrite_weight(model, names, LAYER)
    saved = weight.detach().clone()
    try:
        apply_update_(weight, delta, transposed=names.rewrite_weight_transposed)
        # original ROME: the bare prompt's key now yields v* at the module output
        torch.testing.assert_close(
            _module_out_at_prompt(model, tokenizer), result.value, rtol=1e-4, atol=1e-4
        )
    finally:
        with torch.no_grad():
            weight.copy_(saved)


def test_without_mom2_adjustment_u_is_the_key(
    model: GPT2LMHeadModel, tokenizer: PreTrainedTokenizerFast
) -> None:
    result = rome_edit(
        model,
        tokenizer,
        REQUEST,
        _config(mom2_adjustment=False),
        second_moment=None,
        context_templates=TEMPLATES,
    )
    u = result.updates[0].right[:, 0]
    torch.testing.assert_close(u, result.key / result.key.norm())


def test_rrome_maps_averaged_key_to_value(
    model: GPT2LMHeadModel, tokenizer: PreTrainedTokenizerFast, second_moment: torch.Tensor
) -> None:
    result = rome_edit(
        model,
        tokenizer,
        REQUEST,
        _config(rrome=True),
        second_moment=second_moment,
        context_templates=TEMPLATES,
    )
    names = module_names_for(model)
    module = get_module(model, names.rewrite_module_tmp.format(LAYER))
    w_math = rewrite_weight(model, names, LAYER).T + result.updates[0].dense()  # (d_out, d_in)
    torch.testing.assert_close(
        w_math @ result.key + module.bias, result.value, rtol=1e-4, atol=1e-4
    )
    original = rome_edit(
        model,
        tokenizer,
        REQUEST,
        _config(),
        second_moment=second_moment,
        context_templates=TEMPLATES,
    )
    assert not torch.allclose(result.updates[0].left, original.updates[0].left)


def test_model_unchanged_and_grad_flags_restored(
    model: GPT2LMHeadModel, tokenizer: PreTrainedTokenizerFast, second_moment: torch.Tensor
) -> None:
    before = {k: v.clone() for k, v in model.state_dict().items()}
    probe = model.transformer.wte.weight
    probe.requires_grad_(True)
    try:
        rome_edit(
            model,
            tokenizer,
            REQUEST,
            _config(),
            second_moment=second_moment,
            context_templates=TEMPLATES,
        )
        assert probe.requires_grad and probe.grad is None
        assert not any(p.requires_grad for n, p in model.named_parameters() if "wte" not in n)
    finally:
        probe.requires_grad_(False)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_context_templates_deterministic_for_a_seed(
    model: GPT2LMHeadModel, tokenizer: PreTrainedTokenizerFast
) -> None:
    params = [[5, 2], [8, 3]]
    first = generate_context_templates(model, tokenizer, params, seed=7)
    again = generate_context_templates(model, tokenizer, params, seed=7)
    assert first == again and first[0] == "{}" and len(first) == 1 + 2 + 3
    assert all(t.count("{}") == 1 and t.endswith(". {}") for t in first[1:])
    assert normalize_templates(["a. {}", "{}"]) == ["{}", "a. {}"]


@pytest.mark.parametrize("side", ["left", "right"])
def test_subject_positions_respect_padding(tokenizer: PreTrainedTokenizerFast, side: str) -> None:
    templates = [t.replace("{}", REQUEST.prompt) for t in TEMPLATES] + ["{} is a"]
    subjects = [REQUEST.subject] * len(templates)
    old_side = tokenizer.padding_side
    tokenizer.padding_side = side
    try:
        texts = [t.replace("{}", REQUEST.subject) for t in templates]
        batch = encode_batch(tokenizer, texts, torch.device("cpu"))
        for fact_token, piece_check in [
            ("subject_last", str.endswith),
            ("subject_first", str.startswith),
        ]:
            positions = batch_subject_positions(
                tokenizer, templates, subjects, fact_token, batch["attention_mask"]
            )
            for row, (template, pos) in enumerate(zip(templates, positions, strict=True)):
                assert batch["attention_mask"][row, pos] == 1
                piece = tokenizer.decode(batch["input_ids"][row, pos]).strip()
                assert piece and piece_check(REQUEST.subject, piece), (side, template, piece)
                pads = int((batch["attention_mask"][row] == 0).sum())
                unpadded = subject_index(tokenizer, template, REQUEST.subject, fact_token)
                assert pos == unpadded + (pads if side == "left" else 0)
    finally:
        tokenizer.padding_side = old_side


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize(
    "fact_token", ["subject_last", "subject_first", "subject_first_after_last", "last"]
)
def test_one_call_encoding_equals_tokens_then_positions(
    tokenizer: PreTrainedTokenizerFast, side: str, fact_token: str
) -> None:
    """encode_at_subjects (one tokenizer call with offsets) gives the tokens and positions of
    encode_batch + batch_subject_positions, whatever the padding side and fact token; rows
    of different lengths, and a subject at the very end (the after-last fallback)."""
    templates = [t.replace("{}", REQUEST.prompt) for t in TEMPLATES] + ["{}", "Of {}"]
    subjects = [REQUEST.subject] * (len(templates) - 1) + ["Helka"]
    old_side = tokenizer.padding_side
    tokenizer.padding_side = side
    try:
        texts = [t.replace("{}", s) for t, s in zip(templates, subjects, strict=True)]
        expected = encode_batch(tokenizer, texts, torch.device("cpu"))
        mask = expected["attention_mask"]
        positions = batch_subject_positions(tokenizer, templates, subjects, fact_token, mask)
        inputs, got = encode_at_subjects(
            tokenizer, templates, subjects, fact_token, torch.device("cpu")
        )
        assert got == positions
        assert inputs.keys() == expected.keys()
        for name, tensor in expected.items():
            assert torch.equal(inputs[name], tensor) and inputs[name].dtype == tensor.dtype
        memo = EncodingMemo(tokenizer, torch.device("cpu"))
        assert memo(templates, subjects, fact_token) is memo(templates, subjects, fact_token)
    finally:
        tokenizer.padding_side = old_side


def test_keys_identical_under_left_and_right_padding(
    model: GPT2LMHeadModel, tokenizer: PreTrainedTokenizerFast
) -> None:
    module = module_names_for(model).rewrite_module_tmp.format(LAYER)
    templates = [t.replace("{}", REQUEST.prompt) for t in TEMPLATES]
    subjects = [REQUEST.subject] * len(templates)
    old_side = tokenizer.padding_side
    keys = {}
    try:
        for side in ("left", "right"):
            tokenizer.padding_side = side
            keys[side], _ = module_io_at_subjects(
                model, tokenizer, templates, subjects, module, "subject_last"
            )
    finally:
        tokenizer.padding_side = old_side
    torch.testing.assert_close(keys["left"], keys["right"], rtol=1e-5, atol=1e-5)


def test_trace_captures_edits_and_stops(
    model: GPT2LMHeadModel, tokenizer: PreTrainedTokenizerFast
) -> None:
    inputs = encode_batch(tokenizer, ["Fenna Underhill was born in"], torch.device("cpu"))
    first, last = "transformer.h.0.mlp", "transformer.h.1.mlp"
    with ModuleTrace(model, [first, last], retain_input=True, retain_output=True) as trace:
        clean = model(**inputs).logits
    assert set(trace.outputs) == {first, last} and trace.inputs[first].shape[-1] == 32
    with ModuleTrace(model, [first], edit_output=lambda _n, out: out + 1.0) as trace:
        edited = model(**inputs).logits
    assert not torch.allclose(clean, edited)
    with ModuleTrace(model, [first, last], retain_output=True, stop_after=first) as trace:
        model(**inputs)
        pytest.fail("forward should have stopped")  # pragma: no cover
    assert trace.stopped and set(trace.outputs) == {first}
    assert not model.transformer.h[0].mlp._forward_hooks


def test_apply_update_respects_storage_layout() -> None:
    gen = torch.Generator().manual_seed(0)
    delta = LowRankDelta("m", torch.randn(3, 2, generator=gen), torch.randn(5, 2, generator=gen))
    linear, conv = torch.zeros(3, 5), torch.zeros(5, 3)
    apply_update_(linear, delta, transposed=False)
    apply_update_(conv, delta, transposed=True, alpha=2.0)
    torch.testing.assert_close(linear, delta.dense())
    torch.testing.assert_close(conv, 2.0 * delta.dense().T)
    with pytest.raises(ValueError, match="storage shape"):
        apply_update_(torch.zeros(3, 5), delta, transposed=True)


@pytest.mark.parametrize("early_stop_top1", [False, True])
def test_reusing_lower_layers_changes_nothing(
    model: GPT2LMHeadModel,
    tokenizer: PreTrainedTokenizerFast,
    second_moment: torch.Tensor,
    early_stop_top1: bool,
) -> None:
    def edit(reuse: bool) -> LowRankDelta:
        config = _config(reuse_lower_layers=reuse, early_stop_top1=early_stop_top1)
        result = rome_edit(
            model, tokenizer, REQUEST, config, second_moment=second_moment,
            context_templates=TEMPLATES,
        )  # fmt: skip
        return result.updates[0]

    reused, recomputed = edit(True), edit(False)
    assert torch.equal(reused.left, recomputed.left)
    assert torch.equal(reused.right, recomputed.right)
    for name in ("transformer.h.0", f"transformer.h.{LAYER}.attn", f"transformer.h.{LAYER}.mlp"):
        assert "forward" not in get_module(model, name).__dict__  # restored
