"""Where the plain workers become Ray actors: the one place that calls `ray.remote`.

Each actor class is its worker plus what only makes sense in a Ray process (`node_id`, the
evaluator's fetching of log segments by reference); each `start_*` function creates one
actor with its options: the spec's resources, one process per actor and no restarts (the
pipeline replaces a dead actor itself, `actor_pool`), evaluators and covariance workers
spread over a cluster's nodes. Rows a worker makes say which Ray node made them (`node`),
so a multi-node run shows where its editing, evaluation and covariance shards ran.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray

from seqedit.schemas.campaign import CampaignSpec, ResourcesSpec
from seqedit.workers.covariance_worker import CovarianceWorker, ShardSums
from seqedit.workers.edit_log import parse_edit_log
from seqedit.workers.editor import SequentialEditor
from seqedit.workers.evaluator import EvalResult, EvalTask, Evaluator
from seqedit.workers.stats import StatsConfig

ACTOR_DIED = (
    ray.exceptions.RayActorError,
    ray.exceptions.WorkerCrashedError,
    ray.exceptions.ObjectLostError,
)
"""Errors of a lost actor process (killed, out of memory, node gone): the pipeline replaces
the actor and hands its work out again."""


def actor_options(resources: ResourcesSpec, **more: Any) -> dict[str, Any]:
    """`.options(...)` of an actor with these resources (a process per actor, no restarts:
    the pipeline replaces a dead actor itself)."""
    options: dict[str, Any] = {
        "num_cpus": resources.num_cpus,
        "num_gpus": resources.num_gpus,
        "max_restarts": 0,
        **more,
    }
    if resources.memory is not None:
        options["memory"] = resources.memory
    return options


def spread_options(resources: ResourcesSpec) -> dict[str, Any]:
    """`actor_options` of one of many like actors (evaluators, covariance workers): spread
    over a cluster's nodes."""
    return actor_options(resources, scheduling_strategy="SPREAD")


def device_for(resources: ResourcesSpec) -> str:
    """Where an actor with these resources runs its model."""
    return "cuda" if resources.num_gpus > 0 else "cpu"


def node_id() -> str:
    """The Ray node this process runs on."""
    return ray.get_runtime_context().get_node_id()


# --- the actor classes -------------------------------------------------------------------


class EditorActor(SequentialEditor):
    """The sequential editor as an actor: `node_id` says where it runs."""

    def node_id(self) -> str:
        """The Ray node of this editor."""
        return node_id()


@dataclass(frozen=True)
class Segment:
    """The edit log of steps [start, stop): a reference to `take_edit_log`-style tensors."""

    start: int
    stop: int
    ref: ray.ObjectRef


class EvaluatorActor(Evaluator):
    """An `Evaluator` that fetches, of the log segments it is handed, only those it lacks."""

    def run_task(self, task: EvalTask, segments: list[Segment]) -> EvalResult:
        """`Evaluator.run`, with the log gathered from `segments` (references inside a
        list are not resolved by Ray, so segments already applied are never fetched)."""
        first = task.scored_after[0] if task.scored_after else 0
        start = 0 if first < self.n_steps else self.n_steps
        needed = [s.ref for s in segments if s.stop > start and s.start < task.last_step]
        steps: dict[int, Any] = {}
        for tensors in ray.get(needed):
            steps.update(parse_edit_log(tensors))
        result = self.run(task, steps)
        node = node_id()
        rows = [row.model_copy(update={"node": node}) for row in result.rows]
        return result.model_copy(update={"rows": rows})


class CovarianceActor(CovarianceWorker):
    """A CovarianceWorker actor whose shard sums say which Ray node computed them."""

    def run_shard(self, index: int, documents: Sequence[int], **kwargs: Any) -> ShardSums:
        """`CovarianceWorker.run_shard`, stamped with this actor's node."""
        return super().run_shard(index, documents, **kwargs).model_copy(update={"node": node_id()})


# --- starting them -----------------------------------------------------------------------


def start_editor(spec: CampaignSpec, *, keep_undo: bool) -> ray.actor.ActorHandle:
    """The campaign's `EditorActor` on the spec's resources, at the base model
    (`keep_undo`: it keeps the copy a rollback needs)."""
    actor_cls = ray.remote(EditorActor).options(**actor_options(spec.resources))
    return actor_cls.remote(
        spec.model,
        spec.method,
        spec.hparams,
        stats_dir=spec.stats,
        campaign=spec.name,
        seed=spec.seed,
        torch_threads=spec.resources.torch_threads,
        device=device_for(spec.resources),
        keep_undo=keep_undo,
        retry_factor=spec.health.retry_steps_factor,
    )


def start_evaluator(spec: CampaignSpec, heldout: list[str]) -> ray.actor.ActorHandle:
    """One of the campaign's `EvaluatorActor`s, on `spec.evaluation.resources`."""
    resources = spec.evaluation.resources
    actor_cls = ray.remote(EvaluatorActor).options(**spread_options(resources))
    return actor_cls.remote(
        spec.model,
        spec.method,
        spec.hparams,
        campaign=spec.name,
        device=device_for(resources),
        torch_threads=resources.torch_threads,
        heldout=heldout,
        batch_size=spec.eval_batch_size,
        seed=spec.seed,
    )


def start_covariance_worker(
    model_dir: str | Path, config: StatsConfig, resources: ResourcesSpec
) -> ray.actor.ActorHandle:
    """One `CovarianceActor` of a stats job, on `resources`."""
    actor_cls = ray.remote(CovarianceActor).options(**spread_options(resources))
    return actor_cls.remote(
        str(model_dir), config, device=device_for(resources), torch_threads=resources.torch_threads
    )
