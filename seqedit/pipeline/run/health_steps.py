"""The driver's side of the health checks: one checked edit step with its retries and
rollbacks, the probe and held-out texts, the retention sample, and the trend window rebuilt
from the lake when an editor starts again mid-campaign."""

from __future__ import annotations

import itertools
from pathlib import Path

import ray

from seqedit.pipeline.campaign_dir.parts import list_parts, read_part
from seqedit.pipeline.campaign_dir.state import CampaignState
from seqedit.schemas.campaign import CampaignSpec, HealthSpec, SpecError
from seqedit.schemas.requests import EditRequest
from seqedit.schemas.tables import EditRow, HealthRow
from seqedit.storage import Where
from seqedit.workers.corpus import iter_documents
from seqedit.workers.health import HealthMonitor
from seqedit.workers.health import action as health_action

ROLLBACK = {"retry", "skip", "stop"}
"""Health policies that may roll an edit back (retry: before trying it again, or when every
retry failed too; stop: to the last healthy state). The editor keeps an undo copy for them."""


def needs_undo(health: HealthSpec) -> bool:
    """Whether any per-edit policy of `health` can roll an edit back."""
    return bool(ROLLBACK & {health.on_unverified, health.on_update_norm, health.on_trend})


def checked_step(
    editor: ray.actor.ActorHandle,
    batch: list[EditRequest],
    step: int,
    monitor: HealthMonitor,
    health: HealthSpec,
) -> tuple[list[EditRow], list[HealthRow]]:
    """Apply edit step `step` (one request, or a batch), run the per-edit checks, and act:
    `retry` redoes the step with a larger step budget and another seed, up to `max_retries`
    times, then rolls it back like `skip` if it still fails; `skip`/`stop` roll it back.
    Returns the rows of the step as it ended and the check rows of every try."""
    checks: list[HealthRow] = []
    for retry in itertools.count():
        if len(batch) == 1:
            rows = [ray.get(editor.edit.remote(batch[0], step, retry=retry))]
        else:
            rows = ray.get(editor.edit_batch.remote(batch, step, retry=retry))
        tried = monitor.observe(rows)
        verdict = health_action(tried)
        if verdict == "retry" and retry < health.max_retries:
            checks.extend(tried)
            ray.get(editor.undo_last.remote(keep_step=False))
            continue
        if verdict == "retry":  # every retry failed: roll the edit back, as `skip` would
            tried = [c.model_copy(update={"action": "skip"}) if c.action == "retry" else c
                     for c in tried]  # fmt: skip
        checks.extend(tried)
        if verdict in ROLLBACK:
            ray.get(editor.undo_last.remote())
            rows = [row.model_copy(update={"rolled_back": True}) for row in rows]
        else:
            monitor.keep(rows)
        return rows, checks
    raise AssertionError("unreachable")


def probe_prompts(requests: list[EditRequest], n: int) -> list[str]:
    """The first `n` distinct neighbourhood prompts of `requests` (facts the edits must not
    change), topped up with rewrite prompts when there are too few."""
    prompts = [nb.prompt for r in requests for nb in r.neighborhood_prompts]
    prompts += [r.filled_prompt for r in requests]
    return list(dict.fromkeys(prompts))[:n]


def heldout_texts(health: HealthSpec) -> list[str]:
    """The first `n_heldout` documents of `health.heldout` (none when it is unset)."""
    if health.heldout is None:
        return []
    path = Path(health.heldout)
    if not path.is_file():
        raise FileNotFoundError(f"health.heldout: no held-out text file at {path}")
    texts = list(itertools.islice(iter_documents([path]), health.n_heldout))
    if not texts:
        raise SpecError(f"field 'health.heldout': {path} holds no text")
    return texts


def retention_sample(applied: int, n: int) -> list[int]:
    """Up to `n` evenly spaced indices of the first `applied` edits, first and last included."""
    if applied <= n:
        return list(range(applied))
    return sorted({round(j * (applied - 1) / (n - 1)) for j in range(n)}) if n > 1 else [0]


def rebuild_window(
    spec: CampaignSpec, root: Where, state: CampaignState, before_shard: int
) -> HealthMonitor:
    """A health monitor whose trend window holds the last kept edits before `before_shard`,
    read from the done shards' edit rows: a restarted editor judges trends exactly as the
    uninterrupted run did."""
    monitor = HealthMonitor(spec.health, spec.name)
    kept: list[dict] = []
    for shard, attempt in state.done_partitions():
        if shard >= before_shard:
            continue
        for part in list_parts(root, "edits", shard, attempt):
            kept.extend(r for r in read_part(part).to_pylist() if not r["rolled_back"])
        kept = kept[-spec.health.window :]
    monitor.keep([EditRow(**r) for r in kept])
    return monitor
