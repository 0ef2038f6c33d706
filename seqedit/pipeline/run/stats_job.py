"""Second-moment statistics sharded across Ray actors: resumable, and exact to merge.

The selected documents (every one, or the seeded sample) are split into `shards`
contiguous runs; `actors` CovarianceWorker actors take them from a queue. Each finished
shard's partial sums are written at once to `<out>/shards/shard=<k>.safetensors` (atomic,
checksummed, tagged with the job's key), so a run that is killed resumes where it stopped:
a shard whose file is there and checks out is never computed again. The merge is a sum of
sums in shard order, exact up to float summation order. A dead actor is replaced and its
shard handed out again.

Layout of `<out>`: `stats.safetensors` + `stats.json` (the `stats_store` format, what
campaigns load) once every shard is in, and `shards/` with `job.json` and the partials.
`<out>` is a local path or any storage URI (`s3://bucket/stats?...`): the driver reads and
writes it through `seqedit.storage`, the actors never touch it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import ray
import torch
from pydantic import BaseModel, Field
from tqdm.auto import tqdm
from transformers import AutoConfig

from seqedit.pipeline.run.actors import ACTOR_DIED, actor_options, device_for, node_id
from seqedit.pipeline.run.ray_init import ensure_ray
from seqedit.schemas.campaign import ResourcesSpec
from seqedit.storage import Location, Where, location
from seqedit.workers.corpus import corpus_fingerprint
from seqedit.workers.covariance_worker import CovarianceWorker, ShardSums
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


class StatsJobError(ValueError):
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


def job_key(model_fp: str, corpus_fp: str, config: StatsConfig, shards: int) -> str:
    """What a partial sum depends on: the model and corpus (their fingerprints), every
    setting that changes a sum, and the shard split."""
    identity = {
        "model": model_fp,
        "corpus": corpus_fp,
        "config": config.model_dump(mode="json", exclude={"corpus"}),
        "shards": shards,
    }
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
) -> tuple[StatsResult, StatsJobReport]:
    """Compute the stats of `config` over `shards` shards on `actors` actors (each with
    `resources`: 1 CPU by default), resuming from
    the partials of an earlier run of the same job in `out/shards`, and save them in `out`
    (a local path or a storage URI). `on_shard_done(index)` is called after each shard's
    partial is written."""
    root = location(out)
    started = time.perf_counter()
    documents = selected_documents(config)
    runs = split(documents, shards)
    corpus_fp = corpus_fingerprint(config.corpus, text_column=config.text_column)  # reads it all
    key = job_key(model_fingerprint(model_dir), corpus_fp, config, len(runs))
    _claim_shard_dir(root, key)
    done: dict[int, ShardSums] = {}
    for index in range(len(runs)):
        partial = _read_partial(root, index, key)
        if partial is not None:
            done[index] = partial
    reused = len(done)
    todo = [i for i in range(len(runs)) if i not in done]
    bar = tqdm(total=len(documents), unit="doc", desc="second moments", disable=not progress)
    bar.update(sum(len(runs[i]) for i in done))
    computed_tokens, retried = 0, 0
    nodes: dict[int, str] = {}
    if todo:
        ensure_ray()
        pool = _Pool(model_dir, config, min(actors, len(todo)), resources or ResourcesSpec())
        try:
            attempts = dict.fromkeys(todo, 0)
            for index in todo:
                pool.submit(index, runs[index])
                attempts[index] += 1
            while pool.pending:
                index, result, error = pool.next_done()
                if error is not None:
                    if attempts[index] >= max_attempts:
                        raise RuntimeError(f"shard {index}: worker died {attempts[index]} "
                                           f"times; last: {error}") from error  # fmt: skip
                    log.warning("shard %d: worker died (%s); handing it out again", index, error)
                    retried += 1
                    attempts[index] += 1
                    pool.submit(index, runs[index])
                    continue
                assert result is not None
                _write_partial(root, result, key)
                done[index] = result
                if result.node is not None:
                    nodes[index] = result.node
                computed_tokens += result.tokens
                bar.update(result.documents)
                elapsed = time.perf_counter() - started
                bar.set_postfix(tok_s=f"{computed_tokens / max(elapsed, 1e-9):.0f}")
                if on_shard_done is not None:
                    on_shard_done(index)
        finally:
            bar.close()
            pool.close()
    else:
        bar.close()
    merged = _merge([done[i] for i in range(len(runs))])
    seconds = time.perf_counter() - started
    tokens = sum(part.tokens for part in done.values())
    max_length = _max_length(model_dir, config)
    meta = stats_meta(model_dir, config, max_length, len(documents), tokens, seconds,
                      corpus_fp=corpus_fp)  # fmt: skip
    result = StatsResult(accumulators=merged, meta=meta)
    save_stats(root, result)
    report = StatsJobReport(
        shards=len(runs),
        computed=len(runs) - reused,
        reused=reused,
        retried=retried,
        tokens=tokens,
        computed_tokens=computed_tokens,
        seconds=seconds,
        tokens_per_second=computed_tokens / max(seconds, 1e-9),
        nodes=nodes,
    )
    return result, report


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


class CovarianceActor(CovarianceWorker):
    """A CovarianceWorker actor whose shard sums say which Ray node computed them."""

    def run_shard(self, index: int, documents: Sequence[int], **kwargs: Any) -> ShardSums:
        """`CovarianceWorker.run_shard`, stamped with this actor's node."""
        return super().run_shard(index, documents, **kwargs).model_copy(update={"node": node_id()})


class _Pool:
    """CovarianceWorker actors fed one shard each at a time."""

    def __init__(
        self, model_dir: str | Path, config: StatsConfig, actors: int, resources: ResourcesSpec
    ) -> None:
        options = actor_options(resources, scheduling_strategy="SPREAD")  # over the nodes
        self.make = lambda: ray.remote(CovarianceActor).options(**options).remote(
            str(model_dir), config, device=device_for(resources),
            torch_threads=resources.torch_threads,
        )  # fmt: skip
        self.idle = [self.make() for _ in range(actors)]
        self.queue: list[tuple[int, Sequence[int]]] = []
        self.running: dict[ray.ObjectRef, tuple[int, Any]] = {}

    @property
    def pending(self) -> bool:
        return bool(self.queue or self.running)

    def submit(self, index: int, documents: Sequence[int]) -> None:
        self.queue.append((index, documents))
        self._dispatch()

    def _dispatch(self) -> None:
        while self.queue and self.idle:
            index, documents = self.queue.pop(0)
            actor = self.idle.pop()
            self.running[actor.run_shard.remote(index, documents)] = (index, actor)

    def next_done(self) -> tuple[int, ShardSums | None, BaseException | None]:
        """(shard, its sums, None) of the next shard to finish, or (shard, None, error)
        when its actor died (the actor is replaced)."""
        ready, _ = ray.wait(list(self.running), num_returns=1)
        index, actor = self.running.pop(ready[0])
        try:
            result = ray.get(ready[0])
        except ACTOR_DIED as exc:
            ray.kill(actor)
            self.idle.append(self.make())
            self._dispatch()
            return index, None, exc
        self.idle.append(actor)
        self._dispatch()
        return index, result, None

    def close(self) -> None:
        for actor in [*self.idle, *(actor for _, actor in self.running.values())]:
            ray.kill(actor)
