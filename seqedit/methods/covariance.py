"""Uncentred second moments C = E[k kᵀ] of rewrite-module inputs, in one forward pass.

ROME, MEMIT and AlphaEdit need, for each edited layer, the second moment of the keys k
(the input of the rewrite module, e.g. GPT-2's ``transformer.h.{L}.mlp.c_proj``) over a
text corpus. The reference code runs one full forward pass per layer; here ONE pass per
batch collects the inputs of every requested module, and the forward is stopped as soon
as the last of them has been seen, so no upper layer (nor the LM head) is ever computed.

Pure torch: no I/O, no device literals, no global state. Tensors stay on the device of
the model; sums are kept in float64 (default) or float32.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)

GPT2_REWRITE_MODULE_TMP = "transformer.h.{}.mlp.c_proj"

_ALLOWED_DTYPES = (torch.float32, torch.float64)


class SecondMomentAccumulator:
    """Running uncentred second moment of row vectors: ``sum = Σ x xᵀ`` and a row ``count``.

    ``sum`` has shape (d_in, d_in) and is created on the first :meth:`update` (on the
    device of that input) unless ``d_in`` is given. Sums are exact sums-of-sums, so
    accumulators over disjoint shards can be :meth:`merge`-d in any order.
    """

    def __init__(
        self,
        d_in: int | None = None,
        *,
        dtype: torch.dtype = torch.float64,
        device: torch.device | str | None = None,
    ) -> None:
        if dtype not in _ALLOWED_DTYPES:
            raise ValueError(f"accumulator dtype must be float32 or float64, got {dtype}")
        self.dtype: torch.dtype = dtype
        self.count: int = 0
        self.sum: torch.Tensor | None = (
            None if d_in is None else torch.zeros(d_in, d_in, dtype=dtype, device=device)
        )

    @classmethod
    def from_state(cls, mom2_sum: torch.Tensor, count: int) -> SecondMomentAccumulator:
        """Rebuild an accumulator from a stored sum (d_in, d_in) and its row count."""
        if mom2_sum.ndim != 2 or mom2_sum.shape[0] != mom2_sum.shape[1]:
            raise ValueError(f"mom2_sum must be square (d_in, d_in), got {tuple(mom2_sum.shape)}")
        if count < 0:
            raise ValueError(f"count must be >= 0, got {count}")
        acc = cls(dtype=mom2_sum.dtype)
        acc.sum = mom2_sum.clone()
        acc.count = int(count)
        return acc

    @property
    def d_in(self) -> int | None:
        """Feature dimension, or None before the first update."""
        return None if self.sum is None else int(self.sum.shape[0])

    def update(self, x: torch.Tensor) -> None:
        """Add rows ``x`` (n_tokens, d_in): ``sum += xᵀ x`` (one matmul), ``count += n``."""
        if x.ndim != 2:
            raise ValueError(f"update expects (n_tokens, d_in), got shape {tuple(x.shape)}")
        if self.sum is None:
            self.sum = torch.zeros(x.shape[1], x.shape[1], dtype=self.dtype, device=x.device)
        elif x.shape[1] != self.sum.shape[0]:
            raise ValueError(f"update: d_in {x.shape[1]} != accumulator d_in {self.sum.shape[0]}")
        if x.shape[0] == 0:
            return
        xd = x.detach().to(device=self.sum.device, dtype=self.dtype)
        self.sum.addmm_(xd.T, xd)
        self.count += int(x.shape[0])

    def merge(self, other: SecondMomentAccumulator) -> None:
        """Add another accumulator's sum and count into this one (in place, exact)."""
        if other.sum is None:
            return
        if self.sum is None:
            self.sum = other.sum.to(self.dtype).clone()
            self.count = other.count
            return
        if other.sum.shape != self.sum.shape:
            raise ValueError(f"merge: shape {tuple(other.sum.shape)} != {tuple(self.sum.shape)}")
        self.sum += other.sum.to(device=self.sum.device, dtype=self.dtype)
        self.count += other.count

    def moment(self) -> torch.Tensor:
        """The second moment ``sum / count``, shape (d_in, d_in), in the accumulator dtype."""
        if self.sum is None or self.count == 0:
            raise ValueError("moment of an empty accumulator (no rows were added)")
        return self.sum / self.count


class _StopForward(Exception):
    """Raised inside a pre-hook once every requested module input has been collected."""


def _first_tensor(args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor:
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor):
            return value
    raise TypeError("module was called without a tensor input")


class _InputCapture:
    """Forward pre-hooks that add each module's non-padding inputs to its accumulator, and
    abort the forward once every module has been seen."""

    def __init__(self, accs: dict[str, SecondMomentAccumulator], names: list[str]) -> None:
        self.accs, self.names = accs, names
        self.mask: torch.Tensor | None = None  # (B, T) bool, of the batch running
        self.seen: set[str] = set()

    def hook(self, name: str) -> Callable[..., None]:
        def capture(_module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            if name in self.seen:
                raise RuntimeError(f"{name} was called twice in one forward pass")
            k = _first_tensor(args, kwargs)  # (B, T, d_in)
            assert self.mask is not None
            if k.shape[:2] != self.mask.shape:
                raise RuntimeError(
                    f"{name}: input shape {tuple(k.shape)} does not start with (B, T) "
                    f"{tuple(self.mask.shape)}"
                )
            self.accs[name].update(k[self.mask])  # (n_tokens, d_in)
            self.seen.add(name)
            if len(self.seen) == len(self.names):
                raise _StopForward

        return capture

    def run(self, model: nn.Module, ids: torch.Tensor, att: torch.Tensor) -> int:
        """One forward of ids/att (B, T); returns the number of non-padding tokens."""
        self.mask, self.seen = att.bool(), set()
        try:
            model(input_ids=ids, attention_mask=att, use_cache=False)
        except _StopForward:
            return int(self.mask.sum().item())
        never = sorted(set(self.names) - self.seen)
        raise RuntimeError(f"forward finished without calling modules {never}")


def accumulate_second_moments(
    model: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    module_names: list[str],
    dtype: torch.dtype = torch.float64,
    *,
    accumulators: dict[str, SecondMomentAccumulator] | None = None,
    on_batch: Callable[[int, int], None] | None = None,
) -> dict[str, SecondMomentAccumulator]:
    """Accumulate ``Σ k kᵀ`` of the inputs of every module in ``module_names``.

    Args:
        model: a HF-style causal LM called as ``model(input_ids=..., attention_mask=...)``.
        batches: ``(input_ids (B, T), attention_mask (B, T))`` pairs, moved to the model's
            device here. Positions whose mask is 0 (padding) are excluded.
        module_names: dotted names of the modules whose INPUT k (B, T, d_in) is wanted.
        dtype: accumulation dtype (float64 or float32).
        accumulators: existing accumulators to continue (e.g. resuming); new ones otherwise.
        on_batch: called after each batch with (n_sequences, n_non_pad_tokens).

    Returns:
        module name -> accumulator with ``sum`` (d_in, d_in) and token ``count``.

    One forward per batch; the forward is aborted right after the last requested module
    input is captured (before that module runs), under ``torch.no_grad``.
    """
    if not module_names:
        raise ValueError("module_names is empty")
    if len(set(module_names)) != len(module_names):
        raise ValueError(f"duplicate module names: {module_names}")
    modules = dict(model.named_modules())
    missing = [name for name in module_names if name not in modules]
    if missing:
        raise KeyError(f"modules not found in model: {missing}")
    accs = accumulators if accumulators is not None else {}
    for name in module_names:
        accs.setdefault(name, SecondMomentAccumulator(dtype=dtype))

    device = next(model.parameters()).device
    capture = _InputCapture(accs, module_names)
    handles = [
        modules[name].register_forward_pre_hook(capture.hook(name), with_kwargs=True)
        for name in module_names
    ]
    try:
        with torch.no_grad():
            for input_ids, attention_mask in batches:
                if input_ids.shape != attention_mask.shape or input_ids.ndim != 2:
                    raise ValueError(
                        f"input_ids {tuple(input_ids.shape)} and attention_mask "
                        f"{tuple(attention_mask.shape)} must both be (B, T)"
                    )
                n_tokens = capture.run(model, input_ids.to(device), attention_mask.to(device))
                if on_batch is not None:
                    on_batch(int(input_ids.shape[0]), n_tokens)
    finally:
        for handle in handles:
            handle.remove()
    return accs
