"""LoRA edits: the merged update is exactly the trained adapter, and it learns the target."""

from __future__ import annotations

import pytest
import torch
from transformers import PreTrainedTokenizerFast

from seqedit.methods.arch import module_names_for, module_weight
from seqedit.methods.lora import Adapter, LoraConfig, adapted_modules, completion_batch, lora_edit
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
    config = LoraConfig(num_steps=5, lr=1e-2, lora_dropout=0.0)
    names = module_names_for(model)
    expected = ["attn_qkv"] if architecture == "gpt2" else ["attn_q", "attn_v"]
    assert adapted_modules(config, names, 4) == [
        names.module(role, layer) for layer in range(4) for role in expected
    ]
    torch.manual_seed(0)
    result = lora_edit(model, tokenizer, REQUEST, config)
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
