"""GPT-2's composed tanh-GELU swapped for torch's fused kernel during a value search."""

from __future__ import annotations

import pytest
import torch
from transformers import GPT2LMHeadModel, PreTrainedTokenizerFast
from transformers.activations import NewGELUActivation

from seqedit.methods.fused_activation import fused_tanh_gelu
from tests.methods.tiny import tiny_gpt2


def test_fused_kernel_is_the_same_function_and_the_modules_come_back(
    tokenizer: PreTrainedTokenizerFast,
) -> None:
    model: GPT2LMHeadModel = tiny_gpt2(len(tokenizer))
    originals = [block.mlp.act for block in model.transformer.h]
    assert all(isinstance(act, NewGELUActivation) for act in originals)
    ids = torch.tensor([tokenizer("Fenna Underhill was born in")["input_ids"]])
    with torch.no_grad():
        composed = model(input_ids=ids).logits
        with fused_tanh_gelu(model) as swapped:
            assert swapped == len(originals)
            assert all(isinstance(b.mlp.act, torch.nn.GELU) for b in model.transformer.h)
            fused = model(input_ids=ids).logits
    assert [block.mlp.act for block in model.transformer.h] == originals
    torch.testing.assert_close(fused, composed, rtol=1e-5, atol=1e-5)
    x = torch.linspace(-6, 6, 1001)
    torch.testing.assert_close(torch.nn.GELU(approximate="tanh")(x), NewGELUActivation()(x))
    with pytest.raises(RuntimeError, match="boom"), fused_tanh_gelu(model):
        raise RuntimeError("boom")
    assert [block.mlp.act for block in model.transformer.h] == originals  # back after an error
