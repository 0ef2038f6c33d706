"""Safetensors files written atomically and read back into fresh memory.

Reading copies every tensor out of the file's buffer: BLAS kernels can round the same
matmul differently on differently aligned memory, so a tensor used straight from a
safetensors buffer can give results that differ in the last bits from the one that was
saved (a cached C^-1 once edited differently from a computed one). Large read-only
inputs that are transformed before use (the stats sums) may skip this.
"""

from __future__ import annotations

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from seqedit.storage import Location, Where, location


def write_safetensors(
    path: Where, tensors: dict[str, torch.Tensor], metadata: dict[str, str]
) -> Location:
    """Write `tensors` (as contiguous CPU tensors) with `metadata`, atomically, to a local
    path or any storage URI (`seqedit.storage`)."""
    ready = {name: t.detach().cpu().contiguous() for name, t in tensors.items()}
    return location(path).write_with(lambda tmp: save_file(ready, str(tmp), metadata=metadata))


def read_safetensors(path: Where) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors in fresh allocations, metadata) of a safetensors file, local or on any
    storage URI. Raises `safetensors.SafetensorError` or `OSError` for a missing or
    malformed file."""
    with location(path).local_copy() as local, safe_open(str(local), framework="pt") as handle:
        metadata = handle.metadata() or {}
        tensors = {name: handle.get_tensor(name).clone() for name in handle.keys()}  # noqa: SIM118
    return tensors, metadata
