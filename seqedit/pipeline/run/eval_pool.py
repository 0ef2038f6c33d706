"""The evaluator pool: Ray actors that score the campaign beside the editor (pipelined).

The editor never waits for evaluation. At an evaluation point the driver registers the
edit-log segment written since the last one (an object reference to the editor's
`edit_log_since`, so the factors go from the editor's process to the evaluators' without
passing through the driver) and submits tasks; each evaluator moves its copy of the base
model along the log to the task's step and scores the chunk. Results are collected
whenever the driver looks (`collect`), and at the end (`drain`).

Evaluators are stateless as far as results go (a task's rows depend only on the task and
the log), so a dead evaluator is replaced and its tasks resubmitted.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import ray

from seqedit.pipeline.run.actors import ACTOR_DIED, actor_options, device_for, node_id
from seqedit.schemas.campaign import CampaignSpec
from seqedit.workers.editor import parse_edit_log
from seqedit.workers.evaluator import EvalResult, EvalTask, Evaluator

log = logging.getLogger(__name__)


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


@dataclass
class _Slot:
    """One actor of the pool and the tasks it has not answered yet."""

    actor: Any
    pending: dict[ray.ObjectRef, tuple[EvalTask, Any, list[Segment]]] = field(default_factory=dict)


class EvalPool:
    """`spec.evaluation.actors` evaluator actors fed with `submit`, answered by `collect`.

    A task goes to the actor with the fewest unanswered tasks, so tasks submitted in step
    order reach every actor in step order and no actor moves backwards along the log.
    Each task carries a `tag` (where its rows go), returned with its result.
    """

    def __init__(self, spec: CampaignSpec, heldout: list[str]) -> None:
        self.spec, self.heldout = spec, heldout
        self.segments: list[Segment] = []
        self.slots = [_Slot(self._start_actor()) for _ in range(spec.evaluation.actors)]
        self.restarts = 0

    def _start_actor(self) -> Any:
        resources = self.spec.evaluation.resources
        actor_cls = ray.remote(EvaluatorActor).options(
            **actor_options(resources, scheduling_strategy="SPREAD")  # over a cluster's nodes
        )
        return actor_cls.remote(
            self.spec.model,
            self.spec.method,
            self.spec.hparams,
            campaign=self.spec.name,
            device=device_for(resources),
            torch_threads=resources.torch_threads,
            heldout=self.heldout,
            batch_size=self.spec.eval_batch_size,
            seed=self.spec.seed,
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
        for slot in self.slots:
            stale = [ref for ref, (task, _, _) in slot.pending.items() if task.last_step > step]
            for ref in stale:
                del slot.pending[ref]
            slot.actor.reset.remote()

    # --- tasks ---------------------------------------------------------------------------

    def submit(self, task: EvalTask, tag: Any) -> None:
        """Queue `task` on the least busy actor; the log must reach the task's last step."""
        if task.last_step > self.log_stop:
            raise ValueError(
                f"task needs steps up to {task.last_step}, log ends at {self.log_stop}"
            )
        slot = min(self.slots, key=lambda s: len(s.pending))
        self._send(slot, task, tag, list(self.segments))

    def _send(self, slot: _Slot, task: EvalTask, tag: Any, segments: list[Segment]) -> None:
        ref = slot.actor.run_task.remote(task, segments)
        slot.pending[ref] = (task, tag, segments)

    @property
    def n_pending(self) -> int:
        """Tasks submitted and not collected yet."""
        return sum(len(slot.pending) for slot in self.slots)

    def collect(self, *, wait: bool = False) -> list[tuple[Any, EvalResult]]:
        """(tag, result) of the tasks answered so far (with `wait`: of every task), in
        the order they were submitted to each actor. A dead actor is replaced and its
        unanswered tasks go to the new one."""
        done: list[tuple[Any, EvalResult]] = []
        for index in range(len(self.slots)):
            while self.slots[index].pending:
                pending = self.slots[index].pending
                ref = next(iter(pending))  # an actor answers in submission order
                if not wait and not ray.wait([ref], timeout=0)[0]:
                    break
                try:
                    result = ray.get(ref)
                except ACTOR_DIED as exc:
                    self._replace(index, exc)  # a new slot, holding the unanswered tasks
                    continue
                _, tag, _ = pending.pop(ref)
                done.append((tag, result))
        return done

    def drain(self) -> list[tuple[Any, EvalResult]]:
        """Wait for every submitted task; their (tag, result)."""
        return self.collect(wait=True)

    def _replace(self, index: int, error: BaseException) -> None:
        self.restarts += 1
        if self.restarts > self.spec.max_attempts * len(self.slots):
            raise RuntimeError(f"evaluators died {self.restarts} times; last: {error}") from error
        log.warning("evaluator %d died (%s); starting another and resubmitting", index, error)
        old = self.slots[index]
        ray.kill(old.actor)
        self.slots[index] = _Slot(self._start_actor())
        for task, tag, segments in old.pending.values():
            self._send(self.slots[index], task, tag, segments)

    def close(self) -> None:
        """Stop the actors (unanswered tasks are dropped)."""
        for slot in self.slots:
            ray.kill(slot.actor)
