"""Data-parallel trainer workers as threads of one process: collectives over a barrier, and a
helper that runs two of them for some steps (the trainers' 2-workers-equal-1 tests)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, Protocol


class Steps(Protocol):
    def train_step(self) -> dict[str, float]: ...


class ThreadCollectives:
    """Collectives of workers that are threads of one process (for the tests)."""

    def __init__(self, rank: int, world: int, shared: dict[str, Any]) -> None:
        self.rank, self.world, self.shared = rank, world, shared

    def _exchange(self, value: Any) -> list[Any]:
        barrier: threading.Barrier = self.shared["barrier"]
        slots = self.shared["slots"]
        slots[self.rank] = value
        barrier.wait()
        values = list(slots)
        barrier.wait()
        return values

    def sum_(self, tensor: Any) -> None:
        import torch

        values = self._exchange(tensor.clone())
        tensor.copy_(torch.stack(values).sum(0))

    def gather(self, value: Any) -> list[Any]:
        return self._exchange(value)


def two_thread_workers(
    make: Callable[[ThreadCollectives], Steps], steps: int
) -> tuple[list[Any], list[list[dict[str, float]]]]:
    """Two workers made by `make(collectives)` (each with its own model: a worker's hooks
    must not see the other's forward passes), `steps` training steps each on two threads;
    returns the workers and each one's step metrics."""
    shared: dict[str, Any] = {"barrier": threading.Barrier(2), "slots": [None, None]}
    pair = [make(ThreadCollectives(rank, 2, shared)) for rank in range(2)]
    metrics: list[list[dict[str, float]]] = [[], []]

    def run(rank: int) -> None:
        for _ in range(steps):
            metrics[rank].append(pair[rank].train_step())

    threads = [threading.Thread(target=run, args=(rank,)) for rank in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    return pair, metrics
