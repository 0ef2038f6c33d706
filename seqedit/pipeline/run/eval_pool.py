"""The evaluator pool: Ray actors that score the campaign beside the editor (pipelined).

The editor never waits for evaluation. At an evaluation point the driver registers the
edit-log segment written since the last one (an object reference to the editor's
`edit_log_since`, so the factors go from the editor's process to the evaluators' without
passing through the driver) and submits tasks; each evaluator moves its copy of the base
model along the log to the task's step and scores the chunk. Results are collected
whenever the driver looks (`collect`), and at the end (`drain`).

Evaluators are stateless as far as results go (a task's rows depend only on the task and
the log), so a dead evaluator is replaced and its tasks resubmitted: the retrying actor
pool (`actor_pool`) does that; this file keeps the edit log and its rewind.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import ray

from seqedit.pipeline.run.actor_pool import FailurePolicy, RetryingActorPool
from seqedit.pipeline.run.actors import Segment, start_evaluator
from seqedit.schemas.campaign import CampaignSpec
from seqedit.workers.evaluator import EvalResult, EvalTask


@dataclass(frozen=True)
class _Job:
    """A task as an evaluator gets it: with the log segments registered when it was
    submitted (a resubmitted task reads the same log), and the `tag` it is returned with."""

    task: EvalTask
    tag: Any
    segments: list[Segment]


def _run(actor: ray.actor.ActorHandle, job: _Job) -> ray.ObjectRef:
    return actor.run_task.remote(job.task, job.segments)


class EvalPool:
    """`spec.evaluation.actors` evaluator actors fed with `submit`, answered by `collect`.

    A task goes to the actor with the fewest unanswered tasks, so tasks submitted in step
    order reach every actor in step order and no actor moves backwards along the log.
    Each task carries a `tag` (where its rows go), returned with its result. Evaluators
    that die are replaced up to `spec.max_attempts` times per actor of the pool.
    """

    def __init__(self, spec: CampaignSpec, heldout: list[str]) -> None:
        self.segments: list[Segment] = []
        self.actors = RetryingActorPool(
            lambda: start_evaluator(spec, heldout),
            spec.evaluation.actors,
            _run,
            policy=FailurePolicy(max_deaths=spec.max_attempts * spec.evaluation.actors),
            name="evaluator",
            describe=lambda job: f"task {job.tag}",
        )

    # --- the edit log --------------------------------------------------------------------

    @property
    def log_stop(self) -> int:
        """Steps covered by the registered segments (they cover 0 .. log_stop - 1)."""
        return self.segments[-1].stop if self.segments else 0

    def add_segment(self, start: int, stop: int, ref: ray.ObjectRef) -> None:
        """Register the log of steps [start, stop); it must continue the registered log."""
        if start != self.log_stop or stop <= start:
            raise ValueError(
                f"segment [{start}, {stop}) does not continue the log at {self.log_stop}"
            )
        self.segments.append(Segment(start, stop, ref))

    def rewind(self, step: int) -> None:
        """Forget the log from `step` on (a shard runs again from its checkpoint): later
        segments are dropped, so are unanswered tasks that read them (their rows would
        describe steps that are being redone), and every actor goes back to the base model
        before its next task. With nothing registered from `step` on, nothing changes: no
        actor or task can have gone past what was never registered."""
        if any(s.start < step < s.stop for s in self.segments):
            raise ValueError(f"step {step} is inside a registered segment")
        if self.log_stop <= step:
            return
        self.segments = [s for s in self.segments if s.stop <= step]
        self.actors.drop(lambda job: job.task.last_step > step)
        for actor in self.actors.handles:
            actor.reset.remote()

    # --- tasks ---------------------------------------------------------------------------

    def submit(self, task: EvalTask, tag: Any) -> None:
        """Queue `task` on the least busy actor; the log must reach the task's last step."""
        if task.last_step > self.log_stop:
            raise ValueError(
                f"task needs steps up to {task.last_step}, log ends at {self.log_stop}"
            )
        self.actors.submit(_Job(task, tag, list(self.segments)))

    @property
    def n_pending(self) -> int:
        """Tasks submitted and not collected yet."""
        return self.actors.n_pending

    def collect(self, *, wait: bool = False) -> list[tuple[Any, EvalResult]]:
        """(tag, result) of the tasks answered so far (with `wait`: of every task), in
        the order they were submitted to each actor. A dead actor is replaced and its
        unanswered tasks go to the new one."""
        done = self.actors.drain() if wait else self.actors.collect()
        return [(job.tag, result) for job, result in done]

    def drain(self) -> list[tuple[Any, EvalResult]]:
        """Wait for every submitted task; their (tag, result)."""
        return self.collect(wait=True)

    def close(self) -> None:
        """Stop the actors (unanswered tasks are dropped)."""
        self.actors.close()
