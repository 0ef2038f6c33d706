"""The training loss scores labelled positions only, and equals the full-logits loss."""

from __future__ import annotations

from typing import get_args

import pytest
import torch
import torch.nn.functional as F

from seqedit.testbed.train import TestbedArchitecture, TestbedConfig, init_model, next_token_loss

ARCHITECTURES = list(get_args(TestbedArchitecture))


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_next_token_loss_equals_the_loss_over_all_logits(architecture: TestbedArchitecture) -> None:
    config = TestbedConfig(architecture=architecture, n_embd=32, n_head=4, fast_training=True)
    model = init_model(config, vocab_size=300, eos_id=0)
    gen = torch.Generator().manual_seed(0)
    inputs = torch.randint(300, (3, 12), generator=gen)
    labels = inputs.clone()
    labels[0, :4] = -100  # a context fragment
    labels[1, 9:] = -100  # padding
    mask = (labels != -100).long()
    mask[0] = 1
    logits = model(inputs, attention_mask=mask).logits  # (B, T, V)
    full = F.cross_entropy(
        logits[:, :-1].reshape(-1, 300), labels[:, 1:].reshape(-1), ignore_index=-100
    )
    torch.testing.assert_close(next_token_loss(model, inputs, labels, mask), full, rtol=0, atol=0)
    fast = next_token_loss(model, inputs, labels, mask, labelled_only=True)
    torch.testing.assert_close(fast, full)


def test_fast_training_gelu_is_the_same_function_to_rounding() -> None:
    x = torch.linspace(-6, 6, 1001)
    plain, fused = (
        init_model(TestbedConfig(fast_training=flag), 300, 0).config.activation_function
        for flag in (False, True)
    )
    assert (plain, fused) == ("gelu_new", "gelu_pytorch_tanh")
    exact = 0.5 * x * (1 + torch.tanh((2 / torch.pi) ** 0.5 * (x + 0.044715 * x**3)))
    torch.testing.assert_close(F.gelu(x, approximate="tanh"), exact)
