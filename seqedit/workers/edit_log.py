"""The edit log: every step's updates, as safetensors tensors, with a format version.

Keys (module names never contain "@", so memory keys cannot clash with them):

| key | tensor | written by |
| --- | --- | --- |
| `step<N>.<module>.left` / `.right` | (d_out, r) / (d_in, r) low-rank factors | v1, v2 |
| `step<N>.<module>.dense` | (d_out, d_in) dense delta | v2 |
| `step<N>.@memory.<name>` | a tensor of a memory entry | v2 |
| `step<N>.@memory.@info` | (n,) uint8: the entry's JSON part | v2 |
| `step<N>.rolled_back` | (0,): a step a health policy undid | v1, v2 |

Version 1 (releases before edit contract v2) logged only factors; FT's dense update was
logged as factors with an identity on the smaller side, which still reads and replays to
the same weights. A file records its version in the safetensors metadata
(`editlog_version`; absent = 1); a version newer than this release knows is refused. The
same tensors travel in memory from the editor to the evaluators (no metadata there).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch

from seqedit.errors import SeqeditError
from seqedit.methods.updates import DenseDelta, LowRankDelta, MemoryEntry, Update
from seqedit.storage import Where
from seqedit.workers.tensor_files import read_safetensors, write_safetensors

EDIT_LOG_VERSION = 2
"""The format this release writes; it reads every version up to it."""

_FACTOR = re.compile(r"step(\d+)\.(.+)\.(left|right|dense)")
_MEMORY = re.compile(r"step(\d+)\.@memory\.(.+)")
_ROLLED_BACK = re.compile(r"step(\d+)\.rolled_back")
_INFO = "@info"

Steps = dict[int, list[Update]]
"""Step -> its updates in log order ([] for a rolled-back step)."""


class EditLogError(SeqeditError, ValueError):
    """An edit log that cannot be read, naming the file or key at fault."""


def encode_edit_log(entries: Sequence[tuple[int, Sequence[Update]]]) -> dict[str, torch.Tensor]:
    """(step, updates) entries as edit-log tensors (`parse_edit_log`'s input); a step with
    no updates (rolled back by a health policy) is `step<N>.rolled_back`."""
    tensors: dict[str, torch.Tensor] = {}
    for step, updates in entries:
        if not updates:  # the step happened, and changed nothing
            tensors[f"step{step}.rolled_back"] = torch.zeros(0)
        for update in updates:
            if isinstance(update, LowRankDelta):
                tensors[f"step{step}.{update.module}.left"] = update.left.contiguous()
                tensors[f"step{step}.{update.module}.right"] = update.right.contiguous()
            elif isinstance(update, DenseDelta):
                tensors[f"step{step}.{update.module}.dense"] = update.delta.contiguous()
            else:
                if any(key in tensors for key in _memory_keys(step, update)):
                    raise ValueError(f"step {step}: one memory entry per step")
                for name, tensor in update.tensors.items():
                    tensors[f"step{step}.@memory.{name}"] = tensor.contiguous()
                tensors[f"step{step}.@memory.{_INFO}"] = update.info_bytes()
    return tensors


def _memory_keys(step: int, entry: MemoryEntry) -> list[str]:
    return [f"step{step}.@memory.{name}" for name in (*entry.tensors, _INFO)]


def parse_edit_log(tensors: dict[str, torch.Tensor]) -> Steps:
    """Step -> updates, from edit-log tensors of any version (`encode_edit_log`'s output).
    Weight updates come in module order, a memory entry after them."""
    factors: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    memory: dict[int, dict[str, torch.Tensor]] = {}
    steps: Steps = {}
    for key, tensor in tensors.items():
        if (match := _ROLLED_BACK.fullmatch(key)) is not None:
            steps[int(match[1])] = []
        elif (match := _MEMORY.fullmatch(key)) is not None:
            memory.setdefault(int(match[1]), {})[match[2]] = tensor
        elif (match := _FACTOR.fullmatch(key)) is not None:
            factors.setdefault((int(match[1]), match[2]), {})[match[3]] = tensor
        else:
            raise EditLogError(
                f"edit log key {key!r} is not step<N>.<module>.left|right|dense, "
                "step<N>.@memory.<name> or step<N>.rolled_back"
            )
    for (step, module), parts in sorted(factors.items()):
        steps.setdefault(step, []).append(_weight_update(step, module, parts))
    for step, named in sorted(memory.items()):
        if _INFO not in named:
            raise EditLogError(f"edit log step {step}: memory entry without its @info part")
        info = MemoryEntry.info_from_bytes(named.pop(_INFO))
        fresh = {name: tensor.clone() for name, tensor in named.items()}
        steps.setdefault(step, []).append(MemoryEntry(tensors=fresh, info=info))
    return steps


def _weight_update(step: int, module: str, parts: dict[str, torch.Tensor]) -> Update:
    # fresh allocations: BLAS may round differently on the buffers safetensors returns
    if set(parts) == {"dense"}:
        return DenseDelta(module, parts["dense"].clone())
    if set(parts) == {"left", "right"}:
        return LowRankDelta(module, parts["left"].clone(), parts["right"].clone())
    raise EditLogError(
        f"edit log step {step} module {module!r} holds {sorted(parts)}: a step logs either "
        "left and right factors or one dense delta"
    )


def write_edit_log(path: Where, tensors: dict[str, torch.Tensor], *, campaign: str) -> None:
    """Write one shard's edit-log tensors to `path` (local or storage URI), atomically,
    stamped with this release's format version."""
    metadata = {"campaign": campaign, "editlog_version": str(EDIT_LOG_VERSION)}
    write_safetensors(path, tensors, metadata)


def read_edit_log(path: Where) -> dict[str, torch.Tensor]:
    """The tensors of an edit-log file of any version up to `EDIT_LOG_VERSION`."""
    try:
        tensors, metadata = read_safetensors(path)
    except OSError as exc:
        raise EditLogError(f"{path}: unreadable edit log ({exc})") from exc
    except Exception as exc:  # safetensors raises its own error type for a corrupt file
        raise EditLogError(f"{path}: not a safetensors edit log ({exc})") from exc
    version = metadata.get("editlog_version", "1")
    if not version.isdigit() or int(version) > EDIT_LOG_VERSION:
        raise EditLogError(
            f"{path}: field editlog_version is {version!r}; this release reads versions 1 to "
            f"{EDIT_LOG_VERSION} (upgrade seqedit to read it)"
        )
    return tensors
