"""Low-rank weight deltas (what an edit returns) and applying them to stored weights.

Math convention: a linear map y = W x with W of shape (d_out, d_in). A delta is kept as two
factors, dW = left @ right.T, never as a dense matrix. Storage layouts differ: GPT-2's Conv1D
stores W.T (d_in, d_out); `apply_delta_` takes care of that.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class LowRankDelta:
    """dW = left @ right.T for the weight of module `module`.

    Attributes:
        module: dotted name of the edited module (its `.weight` is the parameter).
        left: (d_out, r) factor.
        right: (d_in, r) factor.
    """

    module: str
    left: torch.Tensor
    right: torch.Tensor

    def __post_init__(self) -> None:
        if self.left.dim() != 2 or self.right.dim() != 2:
            raise ValueError(
                f"{self.module}: factors must be 2-D, got left {tuple(self.left.shape)} "
                f"and right {tuple(self.right.shape)}"
            )
        if self.left.shape[1] != self.right.shape[1]:
            raise ValueError(
                f"{self.module}: rank mismatch, left {tuple(self.left.shape)} vs "
                f"right {tuple(self.right.shape)}"
            )

    @property
    def rank(self) -> int:
        """r, the number of columns of each factor (an upper bound on the true rank)."""
        return int(self.left.shape[1])

    @property
    def shape(self) -> tuple[int, int]:
        """(d_out, d_in) of the dense delta."""
        return int(self.left.shape[0]), int(self.right.shape[0])

    def dense(self) -> torch.Tensor:
        """The dense (d_out, d_in) delta."""
        return self.left @ self.right.T

    def norm(self) -> float:
        """Frobenius norm of left @ right.T from the (r, r) Gram matrices, no dense product.

        ||L R^T||_F^2 = trace((L^T L)(R^T R)) = sum((L^T L) * (R^T R)).
        """
        left = self.left.double()
        right = self.right.double()
        squared = ((left.T @ left) * (right.T @ right)).sum()
        return float(squared.clamp_min(0.0).sqrt())


def apply_delta_(
    weight: torch.Tensor, delta: LowRankDelta, *, transposed: bool, alpha: float = 1.0
) -> torch.Tensor:
    """Add `alpha * dW` in place to `weight`, given in its STORAGE layout.

    Args:
        weight: (d_out, d_in) when `transposed` is False; (d_in, d_out) when True (Conv1D).
        delta: the factors, in the (d_out, d_in) math convention.
        transposed: whether the storage is the transpose of the math convention.
        alpha: scale (use -1.0 to undo a delta).

    Returns the same `weight` tensor.
    """
    left = delta.left.to(device=weight.device, dtype=weight.dtype)
    right = delta.right.to(device=weight.device, dtype=weight.dtype)
    update = right @ left.T if transposed else left @ right.T
    if update.shape != weight.shape:
        raise ValueError(
            f"{delta.module}: delta of storage shape {tuple(update.shape)} does not match the "
            f"weight {tuple(weight.shape)} (transposed={transposed})"
        )
    with torch.no_grad():
        weight.add_(update, alpha=alpha)
    return weight


@dataclass
class EditResult:
    """What one edit computed, plus diagnostics for health checks.

    Attributes:
        deltas: the weight deltas to apply (the model itself is left untouched).
        loss: value-optimisation loss of the returned value vector.
        steps: optimiser steps taken (early stopping makes it smaller than the budget).
        key: (d_in,) key the update is built from (template-averaged input of the module).
        value: (d_out,) target output v* of the module at the subject.
        initial_loss: loss before any optimisation step.
        initial_target_prob: mean P(target_new) over the rewriting prompts before optimisation.
        target_prob: the same after optimisation (with the value delta inserted).
        value_shift_norm: ||v* - v_init||.
        update_norm: Frobenius norm of the sum of `deltas`' dense matrices (per delta, summed).
        denominator: the scalar u^T k dividing the update (small values blow it up).
    """

    deltas: list[LowRankDelta]
    loss: float
    steps: int
    key: torch.Tensor
    value: torch.Tensor
    initial_loss: float = float("nan")
    initial_target_prob: float = float("nan")
    target_prob: float = float("nan")
    value_shift_norm: float = float("nan")
    update_norm: float = float("nan")
    denominator: float = float("nan")
    extras: dict[str, float] = field(default_factory=dict)
