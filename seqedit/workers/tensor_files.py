"""Safetensors files written atomically and read back into fresh memory.

Reading copies every tensor out of the file's buffer: BLAS kernels can round the same
matmul differently on differently aligned memory, so a tensor used straight from a
safetensors buffer can give results that differ in the last bits from the one that was
saved (a cached C^-1 once edited differently from a computed one). Large read-only
inputs that are transformed before use (the stats sums) may skip this.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from seqedit.files import write_atomic


def write_safetensors(
    path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]
) -> Path:
    """Write `tensors` (as contiguous CPU tensors) with `metadata`, atomically."""
    ready = {name: t.detach().cpu().contiguous() for name, t in tensors.items()}
    return write_atomic(path, lambda tmp: save_file(ready, str(tmp), metadata=metadata))


def read_safetensors(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors in fresh allocations, metadata) of a safetensors file. Raises
    `safetensors.SafetensorError` or `OSError` for a missing or malformed file."""
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
        tensors = {name: handle.get_tensor(name).clone() for name in handle.keys()}  # noqa: SIM118
    return tensors, metadata
