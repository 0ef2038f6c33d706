"""The Ray face of the plain workers: each actor class is its worker plus where it runs.

Rows a worker makes say which Ray node made them (`node`), so a multi-node run shows where
its editing, evaluation and covariance shards ran.
"""

from __future__ import annotations

from typing import Any

import ray

from seqedit.schemas.campaign import ResourcesSpec
from seqedit.workers.editor import SequentialEditor

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


def device_for(resources: ResourcesSpec) -> str:
    """Where an actor with these resources runs its model."""
    return "cuda" if resources.num_gpus > 0 else "cpu"


def node_id() -> str:
    """The Ray node this process runs on."""
    return ray.get_runtime_context().get_node_id()


class EditorActor(SequentialEditor):
    """The sequential editor as an actor: `node_id` says where it runs."""

    def node_id(self) -> str:
        """The Ray node of this editor."""
        return node_id()
