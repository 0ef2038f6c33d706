"""`stats build --until-stable EPS`: stop accumulating once what edits use has settled.

The sharded stats job (`stats_job`) then takes the documents in a seeded random order, so
every prefix of shards is a random sample of the corpus, and each shard is a chunk. After
the first k shards are in (in shard order, whatever order they finish in), the
`StabilityMonitor` computes from their sum the quantities edits use for the probe requests'
keys (`methods.covariance_stability`: C^-1 k, and P k for AlphaEdit's threshold) and
compares them with those of the first k-1. P k needs an eigendecomposition of each C, so it
is computed only once C^-1 k has settled (earlier prefixes record no P k change). The first
prefix whose largest relative change is below EPS is the result: the job stops handing
out shards, and the stats are the sum of that prefix, in shard order (so a rerun resumes
from the partials and stops at the same prefix). The evidence (every prefix's tokens and
changes) goes into the stats' metadata.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import ray
from pydantic import BaseModel, ConfigDict, Field, model_validator

from seqedit.methods.covariance import SecondMomentAccumulator
from seqedit.methods.covariance_stability import (
    inverse_quantities,
    projected_quantities,
    relative_change,
)
from seqedit.schemas.requests import EditRequest
from seqedit.workers.covariance_worker import ShardSums

log = logging.getLogger(__name__)


class UntilStable(BaseModel):
    """When to stop: a relative change below `eps` of the probes' quantities between
    consecutive prefixes of shards."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    eps: float = Field(gt=0, lt=1, description="Largest relative change allowed at the stop.")
    prompts: list[str] = Field(min_length=1, description="Probe requests' prompts ('{}').")
    subjects: list[str] = Field(min_length=1, description="Their subjects.")
    nullspace_threshold: float | None = Field(
        default=None, gt=0, description="Also watch AlphaEdit's P k at this threshold."
    )

    @model_validator(mode="after")
    def _paired(self) -> UntilStable:
        if len(self.prompts) != len(self.subjects):
            raise ValueError(f"{len(self.prompts)} prompts but {len(self.subjects)} subjects")
        return self

    @classmethod
    def of_requests(
        cls, eps: float, requests: list[EditRequest], probes: int, threshold: float | None
    ) -> UntilStable:
        """Probes: `probes` requests evenly spaced over `requests`."""
        if not requests:
            raise ValueError("--until-stable needs probe requests (none were given)")
        step = max(1, len(requests) // probes)
        chosen = requests[::step][:probes]
        return cls(eps=eps, prompts=[r.prompt for r in chosen],
                   subjects=[r.subject for r in chosen], nullspace_threshold=threshold)  # fmt: skip


class StableReached(Exception):
    """Raised from a shard callback to stop the job: the prefix of `chunks` shards is stable."""

    def __init__(self, chunks: int) -> None:
        super().__init__(f"stable after {chunks} shards")
        self.chunks = chunks


def probe_keys(actor: Any, rule: UntilStable) -> dict[int, Any]:
    """Layer -> (n, d_in) keys of the probes, computed by a covariance actor (the driver
    does not load the model)."""
    return ray.get(actor.probe_keys.remote(rule.prompts, rule.subjects))


class StabilityMonitor:
    """Follows the prefix of finished shards and decides where the stats stop.

    Args:
        rule: the threshold and probes.
        keys: layer -> (n, d_in) probe keys.
        total: shards in the job.
    """

    def __init__(self, rule: UntilStable, keys: dict[int, Any], total: int) -> None:
        self.rule, self.keys, self.total = rule, keys, total
        self.parts: dict[int, ShardSums] = {}
        self.prefix = 0  # shards 0..prefix-1 are summed into `running`
        self.running: dict[int, SecondMomentAccumulator] = {}
        self.previous: dict[str, Any] | None = None  # C^-1 K of the previous prefix
        self.last_moments: dict[int, Any] | None = None  # its C (for P K when needed)
        self.projected: tuple[int, dict[str, Any]] | None = None  # (prefix, its P K)
        self.evidence: list[dict[str, Any]] = []
        self.stopped_at: int | None = None

    def add(self, part: ShardSums) -> None:
        """Take a finished shard; raise `StableReached` when the prefix it completes (or a
        later one it unblocks) is stable."""
        if self.stopped_at is not None:
            return
        self.parts[part.index] = part
        while self.prefix in self.parts:
            for layer, acc in self.parts[self.prefix].accumulators().items():
                if layer in self.running:
                    self.running[layer].merge(acc)
                else:
                    self.running[layer] = acc
            self.prefix += 1
            if self._check():
                self.stopped_at = self.prefix
                raise StableReached(self.prefix)

    def _check(self) -> bool:
        """Is the prefix just completed stable? C^-1 k first; P k (an eigendecomposition
        per layer) only once C^-1 k has settled, against the previous prefix's P k."""
        moments = {layer: acc.moment() for layer, acc in self.running.items()}
        current = inverse_quantities(moments, self.keys)
        changes = relative_change(self.previous or {}, current)
        self.previous = current
        threshold = self.rule.nullspace_threshold
        if threshold is not None:
            if max(changes.values()) < self.rule.eps:
                changes |= self._projected_change(moments, threshold)
            self.last_moments = moments
        worst = max(changes.values())
        tokens = next(iter(self.running.values())).count
        self.evidence.append({
            "shards": self.prefix,
            "tokens": tokens,
            "max_change": None if math.isinf(worst) else worst,
            "changes": {k: (None if math.isinf(v) else v) for k, v in changes.items()},
        })  # fmt: skip
        log.info("until-stable: %d/%d shards, %d tokens, largest relative change %.3g",
                 self.prefix, self.total, tokens, worst)  # fmt: skip
        return worst < self.rule.eps

    def _projected_change(self, moments: dict[int, Any], threshold: float) -> dict[str, float]:
        """P K's change from the previous prefix (whose P K is computed now if it was not
        needed then)."""
        if self.projected is None or self.projected[0] != self.prefix - 1:
            before = {}
            if self.last_moments is not None:
                before = projected_quantities(self.last_moments, self.keys, threshold)
            self.projected = (self.prefix - 1, before)
        now = projected_quantities(moments, self.keys, threshold)
        change = relative_change(self.projected[1], now)
        self.projected = (self.prefix, now)
        return change

    def record(self) -> dict[str, Any]:
        """The evidence for the stats' metadata."""
        last = self.evidence[-1] if self.evidence else {}
        return {
            "eps": self.rule.eps,
            "nullspace_threshold": self.rule.nullspace_threshold,
            "probes": len(self.rule.prompts),
            "stable": self.stopped_at is not None,
            "shards_used": self.stopped_at or self.prefix,
            "shards_total": self.total,
            "tokens_used": last.get("tokens", 0),
            "final_change": last.get("max_change"),
            "history": self.evidence,
        }
