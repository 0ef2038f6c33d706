"""The Ray face of the plain workers: each actor class is its worker plus where it runs.

Rows a worker makes say which Ray node made them (`node`), so a multi-node run shows where
its editing, evaluation and covariance shards ran.
"""

from __future__ import annotations

import ray

from seqedit.workers.editor import SequentialEditor


def node_id() -> str:
    """The Ray node this process runs on."""
    return ray.get_runtime_context().get_node_id()


class EditorActor(SequentialEditor):
    """The sequential editor as an actor: `node_id` says where it runs."""

    def node_id(self) -> str:
        """The Ray node of this editor."""
        return node_id()
