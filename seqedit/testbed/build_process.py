"""The process a testbed build runs in: quiet transformers progress bars and an allocator
that keeps large blocks for reuse."""

from __future__ import annotations

import contextlib
import ctypes
from collections.abc import Iterator

from transformers.utils import logging as hf_logging

_MMAP_THRESHOLD, _TRIM_THRESHOLD = -3, -1  # glibc mallopt parameters
_KEEP_BYTES = 1 << 30


def keep_large_allocations() -> bool:
    """Ask glibc malloc to reuse freed blocks up to 1 GiB instead of returning each one to
    the kernel. Every training step frees and reallocates its (batch, seq, vocab) logits
    and their gradients (~50 MB each); with glibc's default, each is a fresh mmap whose
    pages fault in again: about a quarter of a step's time goes to the kernel on this
    2-core machine (bench/testbed_build.py). Numerics are unchanged. Returns whether the
    allocator took the setting (False off glibc)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(
            libc.mallopt(_MMAP_THRESHOLD, _KEEP_BYTES)
            and libc.mallopt(_TRIM_THRESHOLD, _KEEP_BYTES)
        )
    except (OSError, AttributeError):
        return False


@contextlib.contextmanager
def quiet_build() -> Iterator[None]:
    """No transformers progress bars (ours counts), restored afterwards; large allocations
    are kept for reuse (`keep_large_allocations`, process-wide).

    Torch's deterministic-algorithms mode is not forced: the build trains on the CPU, whose
    kernels give bit-identical weights for a seed and thread count either way (the same
    model.safetensors, measured on the synthetic-300 and CounterFact-300 builds), and the
    mode cost 6 % of a training step."""
    keep_large_allocations()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if bars:
            hf_logging.enable_progress_bar()
