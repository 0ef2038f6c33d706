"""What every trained editor's data-parallel trainer shares (MEND, SERAC): plain code, no Ray.

Every step takes the same global batch on every worker (a seeded permutation per epoch);
each worker works on rows rank, rank + world, ... of it; gradients are summed over workers
before one optimiser step; metrics are batch means over the global batch. So one worker and
N workers at the same global batch take the same steps, to float rounding. Collective
operations come from a `Collectives` (`LocalCollectives` for one worker; the Ray Train job
passes torch.distributed's).
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence
from typing import Any, Protocol, TypeVar

import torch

from seqedit.schemas.requests import EditRequest

T = TypeVar("T")


class Collectives(Protocol):
    """What workers exchange: sums of tensors, and small objects from every worker."""

    rank: int
    world: int

    def sum_(self, tensor: torch.Tensor) -> None: ...

    def gather(self, value: Any) -> list[Any]: ...


class LocalCollectives:
    """The collectives of a single worker."""

    rank, world = 0, 1

    def sum_(self, tensor: torch.Tensor) -> None:
        """Sum over workers in place (one worker: nothing to do)."""

    def gather(self, value: Any) -> list[Any]:
        return [value]


class EditorTrainer(Protocol):
    """One worker's training state of a trained editor (what the Ray Train job drives)."""

    step: int

    def train_step(self) -> dict[str, float]:
        """One optimiser step on the global batch; its metrics (batch means)."""
        ...

    def validate(self, requests: Sequence[EditRequest]) -> dict[str, float]:
        """Metrics of `requests` under the current parts (means over all workers)."""
        ...

    def state_dict(self) -> dict[str, Any]:
        """Everything a resumed run needs."""
        ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...

    def parts(self) -> dict[str, Any]:
        """The trained parts a campaign edits with (`best/editor.pt`; tensors and plain
        values only), holding the fields of the method's `TrainedParts.fields`."""
        ...


def global_batch(items: Sequence[T], step: int, size: int, seed: int) -> list[T]:
    """The global batch of `step`: consecutive slices of a seeded permutation per epoch."""
    n = len(items)
    per_epoch = max(1, n // size)
    epoch, index = divmod(step, per_epoch)
    order = list(range(n))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return [items[order[(index * size + k) % n]] for k in range(size)]


def my_share(items: Sequence[T], comm: Collectives) -> list[T]:
    """This worker's rows of a global batch: rank, rank + world, ..."""
    return list(items)[comm.rank :: comm.world]


def sum_gradients(parameters: Iterable[torch.nn.Parameter], comm: Collectives) -> None:
    """Sum every parameter's gradient over workers (zeros where a worker had none)."""
    for param in parameters:
        if param.grad is None:
            param.grad = torch.zeros_like(param)
        comm.sum_(param.grad)


def batch_means(sums: dict[str, float], n: int, comm: Collectives) -> dict[str, float]:
    """Metric sums of this worker -> means over all workers' `n` requests together."""
    names = sorted(set().union(*comm.gather(sorted(sums))))
    totals = torch.tensor([sums.get(name, 0.0) for name in names], dtype=torch.float64)
    comm.sum_(totals)
    return {name: float(v) / n for name, v in zip(names, totals.tolist(), strict=True)}


def add_metrics(sums: dict[str, float], metrics: dict[str, float]) -> None:
    """Accumulate one request's metrics into `sums`."""
    for name, value in metrics.items():
        sums[name] = sums.get(name, 0.0) + value
