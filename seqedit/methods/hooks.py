"""Capture and edit the inputs/outputs of named modules during a forward pass.

`ModuleTrace` is our equivalent of the reference `nethook.TraceDict`:

    with ModuleTrace(model, ["transformer.h.2.mlp.c_proj"], retain_input=True) as trace:
        model(**batch)
    keys = trace.inputs["transformer.h.2.mlp.c_proj"]       # (B, T, d_in)

`edit_output(name, output) -> output` replaces a module's primary output tensor (the
first element when the module returns a tuple). `stop_after=name` aborts the forward
pass right after that module ran (a private exception, swallowed on exit), so callers
that only need early layers skip the rest of the network.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from types import TracebackType
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from seqedit.methods.arch import get_module

OutputEditor = Callable[[str, torch.Tensor], torch.Tensor]


class _StopForward(Exception):
    """Raised by a hook to end the forward pass early; caught by `ModuleTrace.__exit__`."""


def _primary_input(args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor | None:
    if args and isinstance(args[0], torch.Tensor):
        return args[0]
    if isinstance(kwargs.get("hidden_states"), torch.Tensor):
        return kwargs["hidden_states"]
    return next((v for v in kwargs.values() if isinstance(v, torch.Tensor)), None)


def primary_output(output: Any) -> torch.Tensor | None:
    """A module's primary output: the tensor itself, or the first element of a tuple."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, tuple | list) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    return None


def _replace_primary(output: Any, new: torch.Tensor) -> Any:
    if isinstance(output, torch.Tensor):
        return new
    return type(output)([new, *output[1:]])


class ModuleTrace:
    """Context manager hooking named modules of `model`.

    Args:
        model: the network (hooks are removed on exit, even on error).
        names: dotted module names to hook.
        retain_input: keep each module's primary input in `self.inputs[name]`.
        retain_output: keep each module's primary output (after editing) in `self.outputs[name]`.
        detach: store detached tensors (set False to backpropagate through captures).
        edit_output: `fn(name, output) -> new_output`, applied to every hooked module.
        stop_after: a module name (hooked even if not in `names`) after which the forward
            pass stops; the `with` body is exited silently at that point.
    """

    def __init__(
        self,
        model: nn.Module,
        names: Sequence[str],
        *,
        retain_input: bool = False,
        retain_output: bool = False,
        detach: bool = True,
        edit_output: OutputEditor | None = None,
        stop_after: str | None = None,
    ) -> None:
        self.model = model
        self.names = list(dict.fromkeys(names))
        self.retain_input = retain_input
        self.retain_output = retain_output
        self.detach = detach
        self.edit_output = edit_output
        self.stop_after = stop_after
        self.inputs: dict[str, torch.Tensor] = {}
        self.outputs: dict[str, torch.Tensor] = {}
        self.stopped = False
        self._handles: list[RemovableHandle] = []

    def _keep(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.detach() if self.detach else tensor

    def _hook(self, name: str, traced: bool, stops: bool) -> Callable[..., Any]:
        def hook(
            _module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any
        ) -> Any:
            if traced:
                if self.retain_input:
                    primary_in = _primary_input(args, kwargs)
                    if primary_in is not None:
                        self.inputs[name] = self._keep(primary_in)
                primary = primary_output(output)
                if self.edit_output is not None and primary is not None:
                    primary = self.edit_output(name, primary)
                    output = _replace_primary(output, primary)
                if self.retain_output and primary is not None:
                    self.outputs[name] = self._keep(primary)
            if stops:
                self.stopped = True
                raise _StopForward
            return output

        return hook

    def __enter__(self) -> ModuleTrace:
        hooked = [*self.names]
        if self.stop_after is not None and self.stop_after not in hooked:
            hooked.append(self.stop_after)
        try:
            for name in hooked:
                module = get_module(self.model, name)
                handle = module.register_forward_hook(
                    self._hook(name, traced=name in self.names, stops=name == self.stop_after),
                    with_kwargs=True,
                )
                self._handles.append(handle)
        except BaseException:
            self.close()
            raise
        return self

    def close(self) -> None:
        """Remove every hook (idempotent)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        self.close()
        return exc_type is not None and issubclass(exc_type, _StopForward)


@contextmanager
def reused_outputs(model: nn.Module, names: Sequence[str]) -> Iterator[None]:
    """Inside the block, each named module runs once and then returns that same output.

    For repeated forward passes over the SAME inputs where these modules cannot change
    (e.g. the blocks below an edited layer during value optimisation): later passes skip
    their computation. Forward hooks on the modules still run. Bit-identical to
    recomputing, on a deterministic device. The original `forward`s come back on exit.
    """
    modules = [get_module(model, name) for name in dict.fromkeys(names)]
    saved: dict[int, Any] = {}
    for index, module in enumerate(modules):
        original = module.forward

        def forward(
            *args: Any, _index: int = index, _original: Callable[..., Any] = original, **kw: Any
        ) -> Any:
            if _index not in saved:
                saved[_index] = _original(*args, **kw)
            return saved[_index]

        module.forward = forward  # type: ignore[method-assign]
    try:
        yield
    finally:
        for module in modules:
            module.__dict__.pop("forward", None)


def outputs_hooked(model: nn.Module) -> bool:
    """Whether a forward hook sits on the whole model (a memory method such as SERAC that
    changes its outputs): then outputs must come from `model(...)`, not from its body and
    head called apart."""
    return bool(model._forward_hooks)
