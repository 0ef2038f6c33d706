"""LeanAdam gives torch.optim.Adam's values bit for bit, stepping each tensor on its own."""

from __future__ import annotations

import pytest
import torch

from seqedit.methods.adam import LeanAdam


def test_lean_adam_equals_torch_adam_bit_for_bit() -> None:
    gen = torch.Generator().manual_seed(0)
    ours = [torch.randn(64, generator=gen).requires_grad_() for _ in range(3)]
    theirs = [p.detach().clone().requires_grad_() for p in ours]
    lean, reference = LeanAdam(ours, lr=0.5), torch.optim.Adam(theirs, lr=0.5)
    for step in range(40):
        grads = [torch.randn(64, generator=gen) * 10 ** (step % 5 - 2) for _ in ours]
        active = [i for i in range(3) if i != step % 3 or step < 10]  # some pause, as in a batch
        lean.zero_grad()
        reference.zero_grad()
        for i in active:
            ours[i].grad, theirs[i].grad = grads[i].clone(), grads[i].clone()
        lean.step(active)
        reference.step()
        for a, b in zip(ours, theirs, strict=True):
            assert torch.equal(a, b), step


def test_stepping_without_a_gradient_is_refused() -> None:
    with pytest.raises(ValueError, match="no gradient"):
        LeanAdam([torch.zeros(3, requires_grad=True)], lr=0.1).step([0])
