"""Forward passes that start at one block: for repeated passes over the same inputs where
nothing below that block can change (the value search).

    with BlockReplay(model, names, first=2) as replay:
        for step in range(n):
            states = replay.final_states(inputs)   # (B, L, d), after the final norm

The first call runs the model's base network in full and records how it called every
block from `first` on (the attention mask, position embeddings and other arguments) and
the input of block `first`. Every later call runs only blocks `first`.. and the final norm,
with those recorded arguments: the same operations on the same tensors as a full pass in
which the lower blocks return what they returned the first time, without the embeddings,
the mask construction and the lower blocks. Forward hooks on the blocks and their
submodules fire as in a full pass.
"""

from __future__ import annotations

from types import TracebackType
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from seqedit.methods.arch import ModuleNames, get_module
from seqedit.methods.hooks import primary_output

Call = tuple[tuple[Any, ...], dict[str, Any]]


class BlockReplay:
    """Context manager replaying blocks `first`..N-1 of `model` (see the module docstring).

    Args:
        model: a causal LM whose `base_model` returns the final-normed hidden states.
        names: its module names (the blocks and the final norm).
        first: the lowest block that runs on every call; None runs the full base network
            every time (the reference's way), through the same interface.
    """

    def __init__(self, model: nn.Module, names: ModuleNames, first: int | None) -> None:
        self.model = model
        self.first = first
        n_blocks = model.config.num_hidden_layers  # type: ignore[union-attr]
        start = n_blocks if first is None else first
        self.blocks = [
            get_module(model, names.layer_module_tmp.format(i)) for i in range(start, n_blocks)
        ]
        self.final_norm = get_module(model, names.ln_f_module)
        self._calls: list[Call] = []
        self._input: torch.Tensor | None = None
        self._handles: list[RemovableHandle] = []

    def _record(self, index: int) -> Any:
        def hook(_module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            if index == 0:
                hidden = args[0] if args else kwargs["hidden_states"]
                self._input = hidden.detach()
            self._calls.append((args, kwargs))

        return hook

    def __enter__(self) -> BlockReplay:
        if self.first is not None:
            for index, block in enumerate(self.blocks):
                handle = block.register_forward_pre_hook(self._record(index), with_kwargs=True)
                self._handles.append(handle)
        return self

    def _stop_recording(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def final_states(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """(B, L, d) hidden states after the final norm for `inputs` (the same inputs on
        every call)."""
        if self.first is None or self._input is None:
            out = self.model.base_model(**inputs, use_cache=False)  # type: ignore[operator]
            self._stop_recording()
            return out.last_hidden_state
        hidden = self._input
        for block, (args, kwargs) in zip(self.blocks, self._calls, strict=True):
            if args:
                out = block(hidden, *args[1:], **kwargs)
            else:
                out = block(**{**kwargs, "hidden_states": hidden})
            primary = primary_output(out)
            if primary is None:
                raise TypeError(f"block {type(block).__name__} returned no tensor: {type(out)}")
            hidden = primary
        return self.final_norm(hidden)

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stop_recording()
        self._calls.clear()
        self._input = None
