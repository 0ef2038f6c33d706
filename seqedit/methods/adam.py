"""Adam for the value search's few small vectors: the update of `torch.optim.Adam` (its
single-tensor path, default betas and eps, no weight decay), without the optimizer's
per-step machinery, which costs more than the update itself for one (d,) vector.

The same operations in the same order give the same values as `torch.optim.Adam`
(tests/methods/test_adam.py checks it bit for bit).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

BETA1, BETA2, EPS = 0.9, 0.999, 1e-8


class LeanAdam:
    """Adam(lr) over `params`, each stepped on its own (`step(indices)`).

    Args:
        params: leaf tensors with `requires_grad`; each keeps its own moments and count.
        lr: the learning rate.
    """

    def __init__(self, params: Sequence[torch.Tensor], lr: float) -> None:
        self.params = list(params)
        self.lr = lr
        self.exp_avg = [torch.zeros_like(p, memory_format=torch.preserve_format) for p in params]
        self.exp_avg_sq = [torch.zeros_like(p, memory_format=torch.preserve_format) for p in params]
        self.steps = [0] * len(self.params)

    def zero_grad(self) -> None:
        for param in self.params:
            param.grad = None

    @torch.no_grad()
    def step(self, indices: Iterable[int]) -> None:
        """One Adam step of each `params[i]` with its `.grad`."""
        for i in indices:
            param, grad = self.params[i], self.params[i].grad
            if grad is None:
                raise ValueError(f"parameter {i} has no gradient to step with")
            exp_avg, exp_avg_sq = self.exp_avg[i], self.exp_avg_sq[i]
            self.steps[i] += 1
            exp_avg.lerp_(grad, 1 - BETA1)
            exp_avg_sq.mul_(BETA2).addcmul_(grad, grad, value=1 - BETA2)
            step = float(self.steps[i])
            step_size = self.lr / (1 - BETA1**step)
            bias_correction2_sqrt = (1 - BETA2**step) ** 0.5
            denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(EPS)
            param.addcdiv_(exp_avg, denom, value=-step_size)
