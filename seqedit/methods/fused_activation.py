"""Torch's fused kernel for GPT-2's tanh-approximated GELU while a value search runs.

GPT-2 (transformers' `NewGELUActivation`, "gelu_new") composes
    0.5 * x * (1 + tanh(sqrt(2 / pi) * (x + 0.044715 * x^3)))
from six elementwise ops, each of whose outputs autograd keeps and runs backwards: on the
golden model about a quarter of a MEMIT batch's time. `nn.GELU(approximate="tanh")` is the
same function in one kernel (equal to float rounding, about 1e-7 relative). The swap lasts
for the `with` block only; the model's own modules come back on exit, also on error.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn

COMPOSED_TANH_GELU = frozenset({"NewGELUActivation"})
"""Class names of composed tanh-GELU modules (transformers.activations)."""


@contextmanager
def fused_tanh_gelu(model: nn.Module) -> Iterator[int]:
    """Replace every composed tanh-GELU module of `model` by `nn.GELU("tanh")` for the
    block; yields how many were replaced (0 for models with other activations)."""
    swapped: list[tuple[nn.Module, str, nn.Module]] = []
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child).__name__ in COMPOSED_TANH_GELU:
                swapped.append((parent, name, child))
    try:
        for parent, name, _ in swapped:
            setattr(parent, name, nn.GELU(approximate="tanh"))
        yield len(swapped)
    finally:
        for parent, name, child in swapped:
            setattr(parent, name, child)
