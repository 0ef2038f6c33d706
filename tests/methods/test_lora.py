"""LoRA edits: the merged update is exactly the trained adapter, and it learns the target."""

from __future__ import annotations

import pytest
import torch
from transformers import PreTrainedTokenizerFast

from seqedit.methods.arch import module_names_for, module_weight, role_of_module
from seqedit.methods.lora import LORA, LoraConfig, LoraContext, adapted_modules, lora_edit
from seqedit.methods.lora_adapter import Adapter, completion_batch
from seqedit.schemas.requests import EditRequest
from seqedit.testbed.text import train_tokenizer
from seqedit.testbed.train import TestbedArchitecture, TestbedConfig, init_model

TEXTS = ["The capital of France is Paris", "The capital of Spain is Madrid"] * 20


def tiny(architecture: TestbedArchitecture) -> tuple[torch.nn.Module, PreTrainedTokenizerFast]:
    tokenizer = train_tokenizer(TEXTS, 300, 64, ["Paris", "Madrid"])
    config = TestbedConfig(architecture=architecture, n_embd=32, n_head=4)
    return init_model(config, len(tokenizer), 0).eval(), tokenizer


REQUEST = EditRequest(
    case_id=1, prompt="The capital of {} is", subject="France", target_new="Madrid",
    target_true="Paris",
)  # fmt: skip


@pytest.mark.parametrize("architecture", ["gpt2", "llama"])
def test_the_merged_update_is_the_trained_adapter(architecture: TestbedArchitecture) -> None:
    model, tokenizer = tiny(architecture)
    config = LoraConfig(num_steps=5, lr=1e-2, lora_dropout=0.0, mode="merge")
    names = module_names_for(model)
    expected = ["attn_qkv"] if architecture == "gpt2" else ["attn_q", "attn_v"]
    assert adapted_modules(config, names, 4) == [
        names.module(role, layer) for layer in range(4) for role in expected
    ]
    torch.manual_seed(0)
    result = lora_edit(model, tokenizer, REQUEST, config, LoraContext())
    assert result.loss < result.initial_loss
    ids, labels = completion_batch(tokenizer, REQUEST, torch.device("cpu"))
    shapes = {d.module: (d.left.shape[0], d.right.shape[0]) for d in result.updates}
    adapter = Adapter(shapes, config, torch.device("cpu"))
    adapter.factors = {  # the trained factors back: A = right^T, B = left / scale
        d.module: (d.right.T.contiguous(), d.left / adapter.scale) for d in result.updates
    }
    with torch.no_grad():
        before = model(input_ids=ids).logits
        with adapter.installed(model, training=False):
            hooked = model(input_ids=ids).logits
        for delta in result.updates:
            weight, transposed = module_weight(model, delta.module, names.rewrite_weight_transposed)
            step = delta.left @ delta.right.T  # (d_out, d_in)
            weight += step.T if transposed else step
        merged = model(input_ids=ids).logits
    torch.testing.assert_close(merged, hooked, atol=1e-5, rtol=0)
    nll = [-torch.log_softmax(x[0, -2], -1)[labels[0, -1]] for x in (before, merged)]
    assert nll[1] < nll[0]


def apply(model: torch.nn.Module, updates: list, transposed: bool) -> None:
    """Add each low-rank update to its module's weight (math convention (d_out, d_in))."""
    with torch.no_grad():
        for delta in updates:
            weight, is_transposed = module_weight(model, delta.module, transposed)
            step = delta.left @ delta.right.T
            weight += step.T if is_transposed else step


@pytest.mark.parametrize("architecture", ["gpt2", "llama"])
def test_a_continued_adapter_logs_the_change_of_ba(architecture: TestbedArchitecture) -> None:
    """Two edits in continue mode: the weights end at W + s B2 A2, the second step is
    rank 2r, and the state round-trips."""
    model, tokenizer = tiny(architecture)
    names = module_names_for(model)
    config = LoraConfig(num_steps=4, lr=1e-2, lora_dropout=0.0, rank=2, layers=[1, 3])
    original = {
        m: module_weight(model, m, names.rewrite_weight_transposed)[0].detach().clone()
        for m in adapted_modules(config, names, 4)
    }
    context = LoraContext()
    torch.manual_seed(0)
    first = lora_edit(model, tokenizer, REQUEST, config, context)
    assert {d.left.shape[1] for d in first.updates} == {4}  # [s B1, -s 0]
    apply(model, first.updates, names.rewrite_weight_transposed)
    second_request = REQUEST.model_copy(update={"subject": "Spain", "target_new": "Paris"})
    second = lora_edit(model, tokenizer, second_request, config, context)
    assert {d.left.shape[1] for d in second.updates} == {4}
    apply(model, second.updates, names.rewrite_weight_transposed)
    scale = config.lora_alpha / config.rank
    for module, (a, b) in context.factors.items():
        weight, transposed = module_weight(model, module, names.rewrite_weight_transposed)
        change = scale * b @ a
        torch.testing.assert_close(
            weight - original[module], change.T if transposed else change, atol=1e-5, rtol=0
        )
    restored = LoraContext()
    LORA.load_state(restored, LORA.state(context))
    for module, (a, b) in context.factors.items():
        assert torch.equal(restored.factors[module][0], a)
        assert torch.equal(restored.factors[module][1], b)
    with pytest.raises(ValueError, match="lora_a"):
        LORA.load_state(restored, {"lora_a.x": torch.zeros(1)})


def test_target_modules_name_roles() -> None:
    assert role_of_module("c_attn") == "attn_qkv"
    assert [role_of_module(n) for n in ("q_proj", "v_proj")] == ["attn_q", "attn_v"]
    assert role_of_module("attn.c_proj") == "attn_out"
    with pytest.raises(ValueError, match=r"ambiguous.*attn_out.*mlp_out"):
        role_of_module("c_proj")
    with pytest.raises(ValueError, match="no block module"):
        role_of_module("lm_head")
    with pytest.raises(ValueError, match="blocks 0-3"):
        adapted_modules(LoraConfig(layers=[4]), module_names_for(tiny("gpt2")[0]), 4)
