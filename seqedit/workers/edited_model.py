"""What edits change in one loaded model: its edited weights and a method's side memory.

The editor and every evaluator hold one `EditedModel` and apply updates only through it,
so an update of any kind (low-rank factors, a dense delta, a memory entry) changes the
editor's model and an evaluator's replayed model the same way. A memory-based method's
memory changes outputs through the one forward hook its `MemoryHooks.install` registers
here; the editor's own scoring and the evaluators both run with it installed.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from seqedit.methods.arch import ModuleNames
from seqedit.methods.config import names_for, validate_config
from seqedit.methods.method import EditMethod, RemovableHandle, SequentialState
from seqedit.methods.registry import get_method
from seqedit.methods.updates import MemoryEntry, Update
from seqedit.workers.edited_weights import EditedWeights, edited_weights
from seqedit.workers.tensor_files import read_safetensors, write_safetensors
from seqedit.workers.trained_parts import prepare_context

Snapshot = tuple[dict[str, torch.Tensor], SequentialState]
"""(fp32 masters by module, memory tensors by name): a point to come back to exactly."""


class EditedModel:
    """The edited weights of `model` and, for a memory-based method, its memory.

    Args:
        model: the loaded model (its edited weights are changed in place).
        method: the campaign's method; `method.modules_in(model, config, names)` are the weights.
        config: the method's validated config.
        names: the model's module names.
        context: the method's per-campaign context (`prepare`'s result), which holds the
            memory of a memory-based method; None for a method without memory.
    """

    def __init__(
        self,
        model: nn.Module,
        method: EditMethod,
        config: Any,
        names: ModuleNames,
        context: Any,
    ) -> None:
        self.method, self.context = method, context
        modules = method.modules_in(model, config, names)
        self.weights: EditedWeights = edited_weights(model, names, modules)
        self._hook: RemovableHandle | None = None
        self._empty: SequentialState = {}
        if method.memory is not None:
            self._empty = method.state(context)
            self._hook = method.memory.install(model, context)

    @property
    def has_memory(self) -> bool:
        """Whether the method keeps a side memory (GRACE) rather than editing weights alone."""
        return self.method.memory is not None

    def apply(self, updates: Iterable[Update]) -> None:
        """Apply updates in order: weight updates to the masters (and the model), memory
        entries to the method's memory."""
        for update in updates:
            if isinstance(update, MemoryEntry):
                if self.method.memory is None:
                    raise ValueError(
                        f"a memory entry for method {self.method.name!r}, which keeps no memory"
                    )
                self.method.memory.apply(self.context, update)
            else:
                self.weights.apply(update)

    def memory_state(self) -> SequentialState:
        """The memory's tensors by name (copies); {} for a method without memory."""
        return self.method.state(self.context) if self.has_memory else {}

    def memory_size(self) -> int | None:
        """Entries in the memory; None for a method without memory."""
        if self.method.memory is None:
            return None
        return self.method.memory.size(self.context)

    def memory_probe(
        self, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str]
    ) -> dict[str, float]:
        """The memory's health metrics on out-of-scope `prompts` (`MemoryHooks.probe`);
        {} for a method without memory or without a probe."""
        memory = self.method.memory
        if memory is None or memory.probe is None:
            return {}
        return memory.probe(self.context, tokenizer, prompts)

    def snapshot(self) -> Snapshot:
        """Copies of the masters and of the memory."""
        return self.weights.copies(), self.memory_state()

    def restore(self, snapshot: Snapshot) -> None:
        """Back to a `snapshot()` exactly."""
        weights, memory = snapshot
        self.weights.load(weights)
        if self.has_memory:
            self.method.load_state(self.context, {k: v.clone() for k, v in memory.items()})

    def reset(self) -> None:
        """Back to the base model: base weights, empty memory."""
        self.restore((self.weights.base, self._empty))

    def fingerprint(self) -> str:
        """sha256 of the fp32 masters of every edited module and, for a memory-based
        method, of its memory tensors (a method without memory hashes as before)."""
        if not self.has_memory:
            return self.weights.fingerprint()
        digest = hashlib.sha256(self.weights.fingerprint().encode())
        for name, tensor in sorted(self.memory_state().items()):
            digest.update(name.encode())
            digest.update(str(tensor.dtype).encode())
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
        return digest.hexdigest()

    def close(self) -> None:
        """Remove the memory hook (the model then answers without the memory)."""
        if self._hook is not None:
            self._hook.remove()
            self._hook = None


MEMORY_FILE = "seqedit_memory.safetensors"
"""A memory-based method's memory beside a rebuilt model's weights."""


def save_memory(edited: EditedModel, config: BaseModel, out_dir: Path) -> Path:
    """Write the memory of `edited` to `out_dir/MEMORY_FILE`, with the method, its version
    and config in the metadata: the weights alone answer as the base model, and
    `attach_memory` puts the memory back in front of them."""
    metadata = {
        "method": edited.method.name,
        "method_version": edited.method.version,
        "config": config.model_dump_json(),
    }
    path = out_dir / MEMORY_FILE
    write_safetensors(path, edited.memory_state(), metadata)
    return path


def attach_memory(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, model_dir: Path
) -> EditedModel:
    """Install the memory saved in `model_dir` (`save_memory`) on a loaded `model`; the
    returned `EditedModel` holds its hook (`close()` removes it)."""
    path = model_dir / MEMORY_FILE
    tensors, metadata = read_safetensors(path)
    method = get_method(metadata.get("method", "?"))
    if method.memory is None or metadata.get("method_version") != method.version:
        raise ValueError(
            f"{path}: field method is {metadata.get('method')!r} version "
            f"{metadata.get('method_version')!r}; this release reads memories of "
            f"{method.name!r} version {method.version}"
        )
    config = validate_config(
        method.config_cls, json.loads(metadata["config"]), where=f"{path} config"
    )
    context = prepare_context(method, model, tokenizer, config, None)
    edited = EditedModel(model, method, config, names_for(model, config), context)
    method.load_state(context, tensors)
    return edited
