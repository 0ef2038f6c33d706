"""Second-moment statistics sharded across Ray actors: resumable, and exact to merge.

The selected documents (every one, or the seeded sample) are split into `shards`
contiguous runs; `actors` CovarianceWorker actors take them from a queue. Each finished
shard's partial sums are written at once to `<out>/shards/shard=<k>.safetensors` (atomic,
checksummed, tagged with the job's key), so a run that is killed resumes where it stopped:
a shard whose file is there and checks out is never computed again. The merge is a sum of
sums in shard order, exact up to float summation order. A dead actor is replaced and its
shard handed out again (`actor_pool`, one shard per actor at a time).

Layout of `<out>`: `stats.safetensors` + `stats.json` (the `stats_store` format, what
campaigns load) once every shard is in, and `shards/` with `job.json` and the partials.
`<out>` is a local path or any storage URI (`s3://bucket/stats?...`): the driver reads and
writes it through `seqedit.storage`, the actors never touch it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import ray
import torch
from pydantic import BaseModel, Field
from tqdm.auto import tqdm
from transformers import AutoConfig

from seqedit.errors import SeqeditError
from seqedit.pipeline.run.actor_pool import FailurePolicy, RetryingActorPool
from seqedit.pipeline.run.actors import start_covariance_worker
from seqedit.pipeline.run.ray_init import ensure_ray
from seqedit.pipeline.run.stats_until_stable import (
    StabilityMonitor,
    StableReached,
    UntilStable,
    probe_keys,
)
from seqedit.schemas.campaign import ResourcesSpec
from seqedit.storage import Location, Where, location
from seqedit.workers.corpus import corpus_fingerprint
from seqedit.workers.covariance_worker import ShardSums
from seqedit.workers.model_io import model_fingerprint
from seqedit.workers.stats import (
    StatsConfig,
    StatsResult,
    context_length,
    selected_documents,
    stats_meta,
)
from seqedit.workers.stats_store import save_stats, tensors_sha256
from seqedit.workers.tensor_files import read_safetensors, write_safetensors

log = logging.getLogger(__name__)


class StatsJobError(SeqeditError, ValueError):
    """A shard directory or partial file that cannot be used; names the file and field."""


class StatsJobReport(BaseModel):
    """What a sharded run did: shards computed here, reused from an earlier run, redone
    after an actor died, and the throughput of the shards computed."""

    shards: int
    computed: int
    reused: int
    retried: int = Field(description="Shards handed out again because their actor died.")
    nodes: dict[int, str] = Field(
        default_factory=dict, description="Ray node of each shard computed in this run."
    )
    tokens: int
    computed_tokens: int
    seconds: float
    tokens_per_second: float
    shards_used: int | None = Field(
        default=None, description="--until-stable: the shards summed (a prefix)."
    )


def job_key(
    model_fp: str, corpus_fp: str, config: StatsConfig, shards: int, *, shuffled: bool = False
) -> str:
    """What a partial sum depends on: the model and corpus (their fingerprints), every
    setting that changes a sum, and the shard split (`shuffled`: the seeded random order
    of `--until-stable`)."""
    identity: dict[str, Any] = {
        "model": model_fp,
        "corpus": corpus_fp,
        "config": config.model_dump(mode="json", exclude={"corpus"}),
        "shards": shards,
    }
    if shuffled:
        identity["order"] = "shuffled"
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


def split(documents: Sequence[int], shards: int) -> list[Sequence[int]]:
    """`documents` in `shards` contiguous runs of near-equal size (none empty)."""
    shards = max(1, min(shards, len(documents)))
    size, extra = divmod(len(documents), shards)
    runs, start = [], 0
    for index in range(shards):
        stop = start + size + (index < extra)
        runs.append(documents[start:stop])
        start = stop
    return runs


def shuffled_runs(documents: Sequence[int], shards: int, seed: int) -> list[Sequence[int]]:
    """`split` of the documents in an order fixed by `seed`, each run sorted (the workers
    read in corpus order): every prefix of runs is a random sample of the corpus."""
    order = list(documents)
    random.Random(seed).shuffle(order)
    return [sorted(run) for run in split(order, shards)]


def shard_path(out: Where, index: int) -> Location:
    """Where shard `index`'s partial sums are kept."""
    return location(out) / "shards" / f"shard={index}.safetensors"


def build_stats_sharded(
    model_dir: str | Path,
    config: StatsConfig,
    out: Where,
    *,
    shards: int,
    actors: int,
    resources: ResourcesSpec | None = None,
    progress: bool = True,
    max_attempts: int = 3,
    on_shard_done: Callable[[int], None] | None = None,
    until_stable: UntilStable | None = None,
) -> tuple[StatsResult, StatsJobReport]:
    """Compute the stats of `config` over `shards` shards on `actors` actors (each with
    `resources`: 1 CPU by default), resuming from
    the partials of an earlier run of the same job in `out/shards`, and save them in `out`
    (a local path or a storage URI). `on_shard_done(index)` is called after each shard's
    partial is written. With `until_stable`, the shards are chunks of a seeded random order
    and the stats are the first prefix of them that is stable (`stats_until_stable`)."""
    root = location(out)
    started = time.perf_counter()
    documents = selected_documents(config)
    shuffled = until_stable is not None
    runs = shuffled_runs(documents, shards, config.seed) if shuffled else split(documents, shards)
    corpus_fp = corpus_fingerprint(config.corpus, text_column=config.text_column)  # reads it all
    key = job_key(model_fingerprint(model_dir), corpus_fp, config, len(runs), shuffled=shuffled)
    _claim_shard_dir(root, key)
    partials = {index: _read_partial(root, index, key) for index in range(len(runs))}
    done = {index: part for index, part in partials.items() if part is not None}
    reused = len(done)
    monitor = None
    if until_stable is not None:
        monitor = _start_monitor(model_dir, config, resources, until_stable, done, len(runs))
    todo = [i for i in range(len(runs)) if i not in done]
    if monitor is not None and monitor.stopped_at is not None:
        todo = []
    bar = tqdm(total=len(documents), unit="doc", desc="second moments", disable=not progress)
    bar.update(sum(len(runs[i]) for i in done))
    computed: list[ShardSums] = []

    def finished(part: ShardSums) -> None:
        _write_partial(root, part, key)  # at once: a run killed later keeps this shard
        done[part.index] = part
        computed.append(part)
        bar.update(part.documents)
        rate = sum(p.tokens for p in computed) / max(time.perf_counter() - started, 1e-9)
        bar.set_postfix(tok_s=f"{rate:.0f}")
        if on_shard_done is not None:
            on_shard_done(part.index)
        if monitor is not None:
            monitor.add(part)  # raises StableReached at the stop

    retried = 0
    try:
        if todo:
            retried = _compute(model_dir, config, runs, todo, actors=actors,
                               resources=resources or ResourcesSpec(),
                               max_attempts=max_attempts, on_done=finished)  # fmt: skip
    except StableReached as stop:
        log.info("stats stable after %d of %d shards; the rest are not computed",
                 stop.chunks, len(runs))  # fmt: skip
    finally:
        bar.close()
    computed_tokens = sum(part.tokens for part in computed)
    nodes = {part.index: part.node for part in computed if part.node is not None}
    used = len(runs) if monitor is None or monitor.stopped_at is None else monitor.stopped_at
    merged = _merge([done[i] for i in range(used)])
    seconds = time.perf_counter() - started
    tokens = sum(done[i].tokens for i in range(used))
    max_length = _max_length(model_dir, config)
    n_docs = sum(len(runs[i]) for i in range(used))
    meta = stats_meta(model_dir, config, max_length, n_docs, tokens, seconds,
                      corpus_fp=corpus_fp)  # fmt: skip
    if monitor is not None:
        meta.until_stable = monitor.record()
    result = StatsResult(accumulators=merged, meta=meta)
    save_stats(root, result)
    report = StatsJobReport(
        shards=len(runs),
        computed=len(computed),
        reused=reused,
        retried=retried,
        tokens=tokens,
        computed_tokens=computed_tokens,
        seconds=seconds,
        tokens_per_second=computed_tokens / max(seconds, 1e-9),
        nodes=nodes,
        shards_used=None if monitor is None else used,
    )
    return result, report


def _start_monitor(
    model_dir: str | Path,
    config: StatsConfig,
    resources: ResourcesSpec | None,
    rule: UntilStable,
    done: dict[int, ShardSums],
    total: int,
) -> StabilityMonitor:
    """The stability monitor, with the probe keys (from a covariance actor) and the
    partials of an earlier run fed in shard order (it may be stable already)."""
    ensure_ray()
    actor = start_covariance_worker(model_dir, config, resources or ResourcesSpec())
    try:
        keys = probe_keys(actor, rule)
    finally:
        ray.kill(actor)
    monitor = StabilityMonitor(rule, keys, total)
    try:
        for index in sorted(done):
            monitor.add(done[index])
    except StableReached:
        pass
    return monitor


def _compute(
    model_dir: str | Path,
    config: StatsConfig,
    runs: list[Sequence[int]],
    todo: list[int],
    *,
    actors: int,
    resources: ResourcesSpec,
    max_attempts: int,
    on_done: Callable[[ShardSums], None],
) -> int:
    """Compute the shards `todo` of `runs` on up to `actors` covariance actors, one shard
    per actor at a time, calling `on_done` with each shard's sums as they come back. A
    shard whose actor dies is handed out again, `max_attempts` times in all. Returns how
    many shards were handed out again."""
    ensure_ray()
    pool = RetryingActorPool(
        lambda: start_covariance_worker(model_dir, config, resources),
        min(actors, len(todo)),
        lambda actor, index: actor.run_shard.remote(index, runs[index]),
        policy=FailurePolicy(max_tries=max_attempts),
        per_actor=1,
        name="covariance worker",
        describe=lambda index: f"shard {index}",
    )
    try:
        for index in todo:
            pool.submit(index)
        while pool.n_pending:
            for _, part in pool.collect(block=True):
                on_done(part)
    finally:
        pool.close()
    return pool.resubmitted


def _max_length(model_dir: str | Path, config: StatsConfig) -> int:
    """The truncation length the workers used: the config's, or the model's context."""
    if config.max_length is not None:
        return config.max_length
    return context_length(AutoConfig.from_pretrained(model_dir, local_files_only=True))


def _merge(parts: list[ShardSums]) -> dict[int, Any]:
    """Layer -> accumulator: the shards' sums and counts added in shard order."""
    merged = parts[0].accumulators()
    for part in parts[1:]:
        for layer, accumulator in part.accumulators().items():
            merged[layer].merge(accumulator)
    return merged


def _claim_shard_dir(root: Location, key: str) -> None:
    """Make `root/shards` belong to job `key`; partials of another job are removed (they
    could never be merged into these stats)."""
    folder = root / "shards"
    marker = folder / "job.json"
    if marker.is_file():
        try:
            recorded = json.loads(marker.read_text(encoding="utf-8")).get("key")
        except (json.JSONDecodeError, AttributeError) as exc:
            raise StatsJobError(f"{marker}: not a job file ({exc}); remove {folder}") from exc
        if recorded == key:
            return
        log.warning("%s holds the partials of another job; starting over", folder)
        for stale in folder.glob("shard=*.safetensors"):
            stale.unlink(missing_ok=True)
    folder.mkdir()
    marker.write_text(json.dumps({"key": key}) + "\n")


def _write_partial(root: Location, part: ShardSums, key: str) -> None:
    tensors: dict[str, torch.Tensor] = {}
    for layer in sorted(part.sums):
        tensors[f"{layer}.mom2_sum"] = part.sums[layer].contiguous()
        tensors[f"{layer}.count"] = torch.tensor(part.counts[layer], dtype=torch.int64)
    metadata = {
        "job": key,
        "documents": str(part.documents),
        "seconds": repr(part.seconds),
        "tensors_sha256": tensors_sha256(tensors),
    }
    write_safetensors(shard_path(root, part.index), tensors, metadata)


def _read_partial(root: Location, index: int, key: str) -> ShardSums | None:
    """Shard `index`'s partial of job `key`, or None when it was never written; a partial
    that does not check out is removed (it is recomputed), with a warning naming it."""
    path = shard_path(root, index)
    if not path.is_file():
        return None
    try:
        tensors, metadata = read_safetensors(path)
        if metadata.get("job") != key:
            raise StatsJobError(f"{path}: field job is not this job's key")
        if metadata.get("tensors_sha256") != tensors_sha256(tensors):
            raise StatsJobError(f"{path}: tensors_sha256: sums corrupt or altered")
        layers = sorted({int(name.split(".")[0]) for name in tensors})
        sums = {layer: tensors[f"{layer}.mom2_sum"] for layer in layers}
        counts = {layer: int(tensors[f"{layer}.count"]) for layer in layers}
    except Exception as exc:  # a truncated file, a foreign file, altered bytes
        log.warning("%s: unusable partial (%s); computing the shard again", path, exc)
        path.unlink(missing_ok=True)
        return None
    return ShardSums(index=index, sums=sums, counts=counts, tokens=next(iter(counts.values())),
                     documents=int(metadata["documents"]),
                     seconds=float(metadata["seconds"]))  # fmt: skip
