"""What the editor needs to know about an editing method, in one small record.

A method module defines its pydantic config and one `EditMethod` value; the registry lists
them. No inheritance: the editor calls the functions held here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from pydantic import BaseModel
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from seqedit.methods.arch import ModuleNames
from seqedit.methods.updates import EditResult, MemoryEntry
from seqedit.schemas.requests import EditRequest

Derived = dict[int, dict[str, torch.Tensor]]
"""layer -> named tensors computed from that layer's second moment alone (e.g. C^-1)."""


class Prepare(Protocol):
    """(model, tokenizer, config, second moments by layer or None, derived tensors or None)
    -> the per-campaign context. `derived` (from `EditMethod.derive`, possibly loaded from a
    cache) replaces recomputing them; without it `prepare` computes them itself."""

    def __call__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        config: Any,
        second_moments: dict[int, torch.Tensor] | None,
        derived: Derived | None = None,
        /,
    ) -> Any: ...


Derive = Callable[[Any, torch.Tensor], dict[str, torch.Tensor]]
"""(config, one layer's second moment C (d_in, d_in)) -> tensors derived from C alone."""

Edit = Callable[[PreTrainedModel, PreTrainedTokenizerBase, EditRequest, Any, Any], EditResult]
"""(model, tokenizer, request, config, context) -> the deltas of one edit (model untouched)."""


BatchEdit = Callable[
    [PreTrainedModel, PreTrainedTokenizerBase, list[EditRequest], Any, Any], EditResult
]
"""(model, tokenizer, requests, config, context) -> the deltas of one batch of edits."""


SequentialState = dict[str, torch.Tensor]
"""What a method carries from one edit to the next, by name (e.g. AlphaEdit's "cache_c.5")."""


def no_state(_context: Any) -> SequentialState:
    """The sequential state of a method that carries none."""
    return {}


def load_no_state(_context: Any, state: SequentialState) -> None:
    """Restore the (empty) state of a stateless method; anything else is a mistake."""
    if state:
        raise ValueError(f"this method carries no sequential state, got {sorted(state)}")


def one_at_a_time(batch: BatchEdit) -> Edit:
    """The `Edit` of a batched method: a batch of one, with key and value of that request.

    The batch result holds keys (n, d_in) and values (n, d); the single edit's are row 0.
    """

    def edit(
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        request: EditRequest,
        config: Any,
        context: Any,
    ) -> EditResult:
        result = batch(model, tokenizer, [request], config, context)
        result.key, result.value = result.key[0], result.value[0]
        return result

    return edit


class RemovableHandle(Protocol):
    """What `register_forward_hook` returns."""

    def remove(self) -> None: ...


@dataclass(frozen=True)
class MemoryHooks:
    """How a memory-based method (GRACE) changes the model's outputs without changing weights.

    Its memory lives in the per-campaign context (`prepare`'s result); `EditMethod.state`
    returns it as tensors (checkpointed and counted in the weights fingerprint) and
    `load_state` puts it back. An edit returns `MemoryEntry`s and leaves the memory alone.

    Attributes:
        install: (model, context) -> handle: the one forward hook through which the memory
            changes outputs. The editor's scoring and every evaluator install it the same way.
        apply: (context, entry) -> None: add one logged entry to the memory (after an edit,
            and when an evaluator or `seqedit rebuild` replays the edit log).
        size: (context) -> entries in the memory (recorded instead of update norms).
    """

    install: Callable[[PreTrainedModel, Any], RemovableHandle]
    apply: Callable[[Any, MemoryEntry], None]
    size: Callable[[Any], int]


@dataclass(frozen=True)
class EditMethod:
    """One registered editing method.

    Attributes:
        name: registry key ("rome").
        version: bumped whenever the math changes; recorded in every edit row.
        config_cls: pydantic config (extra="forbid") validated from the campaign's hparams.
        layers: the layers of the rewrite module a config is about; when it
            `uses_second_moment`, covariance statistics are built and loaded for these.
        modules: (config, the model's module names) -> the dotted names of the linear maps
            (`nn.Linear` / `Conv1D`) whose weights a config edits; [] for memory methods.
        uses_second_moment: whether a config needs covariance statistics.
        prepare: work done once per campaign (context templates, inverse covariances).
        edit: compute the deltas of one request.
        edit_batch: compute the deltas of several requests as one step (None: one at a time).
        state: the sequential state in a context (copies), for checkpoints.
        load_state: put a saved sequential state back into a context.
        derive: expensive per-layer tensors that depend only on C and the config fields
            named by `derive_key` (inverse covariance, null-space basis); the editor caches
            them next to the stats and hands them to `prepare`. None: nothing to cache.
        derive_key: the config fields `derive` reads (part of the cache key).
        memory: for memory-based methods, how their side state changes outputs.
    """

    name: str
    version: str
    config_cls: type[BaseModel]
    layers: Callable[[Any], list[int]]
    modules: Callable[[Any, ModuleNames], list[str]]
    uses_second_moment: Callable[[Any], bool]
    prepare: Prepare
    edit: Edit
    edit_batch: BatchEdit | None = None
    state: Callable[[Any], SequentialState] = no_state
    load_state: Callable[[Any, SequentialState], None] = load_no_state
    derive: Derive | None = None
    derive_key: Callable[[Any], dict[str, Any]] = lambda _config: {}
    memory: MemoryHooks | None = None

    @property
    def batched(self) -> bool:
        """Whether the method edits several requests as one step (`edit_batch`)."""
        return self.edit_batch is not None


def rewrite_modules(layers: list[int], names: ModuleNames) -> list[str]:
    """The rewrite module (MLP output projection) of each of `layers`."""
    return [names.rewrite_module_tmp.format(layer) for layer in layers]
