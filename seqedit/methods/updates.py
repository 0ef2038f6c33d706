"""What an edit returns: typed updates, and applying weight updates to stored weights.

An update is one of
  * `LowRankDelta`: dW = left @ right.T (ROME, MEMIT, AlphaEdit; rank <= batch size);
  * `DenseDelta`: dW itself (fine-tuning), stored as it is, with no identity factor;
  * `MemoryEntry`: what a memory-based editor (GRACE) adds to its side state: tensors plus
    a small JSON part. It changes no weight; the method's `MemoryHooks` apply it.

Math convention: a linear map y = W x with W of shape (d_out, d_in). Storage layouts differ:
GPT-2's Conv1D stores W.T (d_in, d_out); `apply_update_` takes care of that.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

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


@dataclass(frozen=True)
class DenseDelta:
    """dW itself for the weight of module `module` (what fine-tuning computes).

    Attributes:
        module: dotted name of the edited module (its `.weight` is the parameter).
        delta: (d_out, d_in) update in the math convention.
    """

    module: str
    delta: torch.Tensor

    def __post_init__(self) -> None:
        if self.delta.dim() != 2:
            raise ValueError(f"{self.module}: a dense delta is 2-D, got {tuple(self.delta.shape)}")

    @property
    def shape(self) -> tuple[int, int]:
        """(d_out, d_in)."""
        return int(self.delta.shape[0]), int(self.delta.shape[1])

    def dense(self) -> torch.Tensor:
        """The dense (d_out, d_in) delta."""
        return self.delta

    def norm(self) -> float:
        """Frobenius norm of dW, accumulated in float64."""
        return float(self.delta.double().norm())


@dataclass(frozen=True)
class MemoryEntry:
    """What a memory-based editor adds to its side state at one step.

    Attributes:
        tensors: name -> tensor, as the method defines them (GRACE: the codebook rows it
            writes: `rows` (m,), `keys` (m, d), `values` (m, d), `radii` (m,)).
        info: a small JSON-serialisable part (GRACE: the labels of the rows it writes).
    """

    tensors: dict[str, torch.Tensor]
    info: dict[str, Any] = field(default_factory=dict)

    def info_bytes(self) -> torch.Tensor:
        """`info` as a (n,) uint8 tensor of its UTF-8 JSON, for the edit log."""
        data = json.dumps(self.info, sort_keys=True).encode()
        return torch.frombuffer(bytearray(data), dtype=torch.uint8).clone()

    @staticmethod
    def info_from_bytes(data: torch.Tensor) -> dict[str, Any]:
        """The inverse of `info_bytes`."""
        return json.loads(bytes(data.to(torch.uint8).tolist()).decode())


WeightUpdate = LowRankDelta | DenseDelta
"""An update of one module's weight."""

Update = LowRankDelta | DenseDelta | MemoryEntry
"""Anything one edit step returns."""


def non_finite(updates: list[Update]) -> str | None:
    """What holds NaN/Inf among `updates` ("<module> update" or "memory entry"), or None."""
    for update in updates:
        if isinstance(update, MemoryEntry):
            tensors, what = list(update.tensors.values()), "memory entry"
        elif isinstance(update, DenseDelta):
            tensors, what = [update.delta], f"{update.module} update"
        else:
            tensors, what = [update.left, update.right], f"{update.module} update"
        if not all(bool(torch.isfinite(t).all()) for t in tensors if t.is_floating_point()):
            return what
    return None


def apply_update_(
    weight: torch.Tensor, update: WeightUpdate, *, transposed: bool, alpha: float = 1.0
) -> torch.Tensor:
    """Add `alpha * dW` in place to `weight`, given in its STORAGE layout.

    Args:
        weight: (d_out, d_in) when `transposed` is False; (d_in, d_out) when True (Conv1D).
        update: the factors or the dense delta, in the (d_out, d_in) math convention.
        transposed: whether the storage is the transpose of the math convention.
        alpha: scale (use -1.0 to undo a delta).

    Returns the same `weight` tensor.
    """
    if isinstance(update, DenseDelta):
        dense = update.delta.to(device=weight.device, dtype=weight.dtype)
        change = dense.T if transposed else dense
    else:
        left = update.left.to(device=weight.device, dtype=weight.dtype)
        right = update.right.to(device=weight.device, dtype=weight.dtype)
        change = right @ left.T if transposed else left @ right.T
    if change.shape != weight.shape:
        raise ValueError(
            f"{update.module}: delta of storage shape {tuple(change.shape)} does not match the "
            f"weight {tuple(weight.shape)} (transposed={transposed})"
        )
    with torch.no_grad():
        weight.add_(change, alpha=alpha)
    return weight


@dataclass
class EditResult:
    """What one edit computed, plus diagnostics for health checks.

    Attributes:
        updates: what to apply (the model and the method's memory are left untouched).
        loss: value-optimisation loss of the returned value vector.
        steps: optimiser steps taken (early stopping makes it smaller than the budget).
        key: (d_in,) key the update is built from (template-averaged input of the module).
        value: (d_out,) target output v* of the module at the subject.
        initial_loss: loss before any optimisation step.
        initial_target_prob: mean P(target_new) over the rewriting prompts before optimisation.
        target_prob: the same after optimisation (with the value delta inserted).
        value_shift_norm: ||v* - v_init||.
        update_norm: Frobenius norm of the weight updates (per update, combined).
        denominator: the scalar u^T k dividing the update (small values blow it up).
    """

    updates: list[Update]
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
