"""The LoRA adapter of `lora` and `dpo`: trainable A (r, d_in) and B (d_out, r) per module,
run as forward hooks on our module names (Conv1D and nn.Linear alike) with peft's math,
and the Adam loop that trains it on a loss (see `seqedit/methods/lora.py`)."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from seqedit.methods.adapter_losses import IGNORE
from seqedit.methods.keys_values import frozen_parameters
from seqedit.methods.updates import LowRankDelta
from seqedit.schemas.requests import EditRequest, spaced

if TYPE_CHECKING:
    from seqedit.methods.lora import LoraConfig

Factors = dict[str, tuple[torch.Tensor, torch.Tensor]]
"""module -> (A (r, d_in), B (d_out, r)), float32."""


class Adapter:
    """Trainable A (r, d_in) and B (d_out, r) per module, added to its output by hooks.

    With `start` (continue mode) A and B begin at its factors (A0, B0), or at a fresh init
    (A0, 0) for a module it lacks (the first edit), and the hooks add only the change
    s (B A - B0 A0) x: the model already holds s B0 A0. Every continued step is then rank 2r.
    """

    def __init__(
        self,
        shapes: dict[str, tuple[int, int]],
        config: LoraConfig,
        device: torch.device,
        start: Factors | None = None,
    ) -> None:
        self.scale = config.lora_alpha / config.rank
        self.dropout = config.lora_dropout
        self.start: Factors = {}
        self.factors: Factors = {}
        for module, (d_out, d_in) in shapes.items():
            if start is not None and module in start:
                a, b = (t.detach().clone().to(device) for t in start[module])
            else:
                a = torch.empty(config.rank, d_in, device=device)
                torch.nn.init.kaiming_uniform_(a, a=math.sqrt(5))
                b = torch.zeros(d_out, config.rank, device=device)
            if start is not None:  # continued: the change is counted from (A0, B0)
                self.start[module] = (a.clone(), b.clone())
            self.factors[module] = (a.requires_grad_(True), b.requires_grad_(True))

    def parameters(self) -> list[torch.Tensor]:
        return [t for pair in self.factors.values() for t in pair]

    def _change(self, module: str, x: torch.Tensor) -> torch.Tensor:
        """s (B A - B0 A0) x for x (..., d_in) -> (..., d_out)."""
        a, b = self.factors[module]
        out = x @ a.T @ b.T
        if module in self.start:
            a0, b0 = (t.to(x.device) for t in self.start[module])
            out = out - x @ a0.T @ b0.T
        return self.scale * out

    @contextmanager
    def installed(self, model: PreTrainedModel, *, training: bool) -> Iterator[None]:
        """The adapter's forward hooks on `model`, removed on exit."""
        handles = []
        for module in self.factors:

            def hook(_mod: Any, args: tuple[Any, ...], out: torch.Tensor, module=module) -> Any:
                x = F.dropout(args[0], self.dropout, training=training)
                return out + self._change(module, x.to(torch.float32)).to(out.dtype)

            handles.append(model.get_submodule(module).register_forward_hook(hook))
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def trained(self) -> Factors:
        """The trained (A, B) per module, detached copies."""
        return {m: (a.detach().clone(), b.detach().clone()) for m, (a, b) in self.factors.items()}

    def deltas(self) -> list[LowRankDelta]:
        """The weight change per module as low-rank factors: s B A (fresh adapter), or
        s (B A - B0 A0) as left [s B, -s B0] and right [A, A0]^T (continued one)."""
        out = []
        for module, (a, b) in self.trained().items():
            left, right = self.scale * b, a.T
            if module in self.start:
                a0, b0 = self.start[module]
                left = torch.cat([left, -self.scale * b0.to(b)], dim=1)
                right = torch.cat([right, a0.to(a).T], dim=1)
            out.append(LowRankDelta(module, left.contiguous(), right.contiguous()))
        return out


def completion_batch(
    tokenizer: PreTrainedTokenizerBase, request: EditRequest, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """(1, T) ids of prompt + target and (1, T) labels with the prompt masked."""
    prompt = list(tokenizer(request.filled_prompt)["input_ids"])
    target = list(tokenizer(spaced(request.target_new), add_special_tokens=False)["input_ids"])
    if not prompt or not target:
        raise ValueError(f"case {request.case_id}: empty tokenisation of prompt or target")
    ids = torch.tensor([prompt + target], device=device)
    labels = torch.tensor([[IGNORE] * len(prompt) + target], device=device)
    return ids, labels


def train_adapter(
    model: PreTrainedModel,
    adapter: Adapter,
    config: LoraConfig,
    loss_of: Callable[[], torch.Tensor],
    nll_of: Callable[[], torch.Tensor],
) -> tuple[float, float]:
    """`config.num_steps` Adam steps on `loss_of()` (called with the adapter installed, in
    training mode); returns (NLL before, NLL after) of the target (`nll_of`, no dropout)."""
    optimizer = torch.optim.Adam(
        adapter.parameters(), lr=config.lr, weight_decay=config.weight_decay
    )
    with frozen_parameters(model):
        with torch.no_grad(), adapter.installed(model, training=False):
            before = float(nll_of())
        for _ in range(config.num_steps):
            with adapter.installed(model, training=True):
                loss = loss_of()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        with torch.no_grad(), adapter.installed(model, training=False):
            after = float(nll_of())
    return before, after
