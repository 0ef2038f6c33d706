"""Which evaluation tasks fall due after an edit step, and where their rows go.

The plan is a pure function of the spec, the requests and the step, so the driver of a
resumed campaign can tell which tasks of a done shard never wrote their rows (their part
file is missing) and submit exactly those again.

Protocols (every row says which, `schemas.tables.Protocol`):
- retention: at every `eval_every` edits (and when a health policy stops the campaign),
  all records edited so far, on the model as it stands;
- final: after the last edit, all records;
- immediate (`evaluation.immediate`): each record right after its own step, submitted in
  blocks of about `evaluation.chunk` records (and at the end of each shard).
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from seqedit.schemas.campaign import CampaignSpec
from seqedit.schemas.requests import EditRequest
from seqedit.schemas.tables import Protocol
from seqedit.workers.evaluator import EvalTask

IMMEDIATE, AT_POINT = 1, 2
"""Last digit of a part number: which kind of task wrote the part."""


def part_number(step: int, kind: int, chunk: int = 0) -> int:
    """The part (file) of one task's rows inside its shard attempt's partition: unique per
    (step, chunk, kind), and never 0 (the edit and health rows' part)."""
    if not 0 <= chunk < 10_000:
        raise ValueError(f"chunk {chunk} out of range")
    return step * 100_000 + chunk * 10 + kind


def crossed(every: int | None, before: int, after: int) -> bool:
    """Whether the edit count passed a multiple of `every` going from `before` to `after`."""
    return bool(every) and after // every > before // every  # type: ignore[operator]


def is_point(spec: CampaignSpec, step: int, *, stopped: bool) -> bool:
    """Whether all records edited so far are scored after `step` (retention or final)."""
    positions = spec.step_edits(step)
    last = positions.stop == spec.n_edits
    return last or stopped or crossed(spec.eval_every, positions.start, positions.stop)


class PlannedTask(BaseModel):
    """One evaluation task before its records are looked up: what `due_tasks` builds."""

    model_config = ConfigDict(frozen=True)

    part: int
    protocol: Protocol
    first_step: int = Field(description="immediate: the block's first step; else its step")
    step: int = Field(description="The step after which the task falls due.")
    chunk: int = 0


def plan(
    spec: CampaignSpec, step: int, *, shard_start: int, shard_stop: int, stopped: bool = False
) -> list[PlannedTask]:
    """The tasks due once `step` is applied (in shard [`shard_start`, `shard_stop`));
    `stopped`: a health policy ends the campaign here."""
    planned: list[PlannedTask] = []
    evaluation = spec.evaluation
    if evaluation.immediate:
        block = max(1, evaluation.chunk // spec.edits_per_step)
        if (step + 1 - shard_start) % block == 0 or step == shard_stop - 1 or stopped:
            first = shard_start + (step - shard_start) // block * block
            part = part_number(step, IMMEDIATE)
            planned.append(PlannedTask(part=part, protocol="immediate", first_step=first,
                                       step=step))  # fmt: skip
    if is_point(spec, step, stopped=stopped):
        applied = spec.step_edits(step).stop
        protocol: Protocol = "final" if applied == spec.n_edits else "retention"
        for chunk in range(-(-applied // evaluation.chunk)):
            part = part_number(step, AT_POINT, chunk)
            planned.append(PlannedTask(part=part, protocol=protocol, first_step=step, step=step,
                                       chunk=chunk))  # fmt: skip
    return planned


def shard_plan(spec: CampaignSpec, shard_start: int, shard_stop: int) -> list[PlannedTask]:
    """Every task of a shard that ran to its end (not stopped), in step order."""
    return [
        planned
        for step in range(shard_start, shard_stop)
        for planned in plan(spec, step, shard_start=shard_start, shard_stop=shard_stop)
    ]


def due_tasks(
    spec: CampaignSpec,
    requests: list[EditRequest],
    step: int,
    *,
    shard_start: int,
    shard_stop: int,
    stopped: bool = False,
) -> list[tuple[int, EvalTask]]:
    """(part number, task) of the tasks due once `step` is applied (`plan`)."""
    planned = plan(spec, step, shard_start=shard_start, shard_stop=shard_stop, stopped=stopped)
    return [(p.part, build_task(spec, requests, p)) for p in planned]


def build_task(spec: CampaignSpec, requests: list[EditRequest], planned: PlannedTask) -> EvalTask:
    """The task `planned` stands for, with its records."""
    if planned.protocol == "immediate":
        return _immediate(spec, requests, planned.first_step, planned.step)
    return _at_point(spec, requests, planned.step, planned.chunk)


def _immediate(spec: CampaignSpec, requests: list[EditRequest], first: int, last: int) -> EvalTask:
    """Records of steps first..last, each scored right after its own step."""
    members = [(step, i) for step in range(first, last + 1) for i in spec.step_edits(step)]
    return EvalTask(
        protocol="immediate",
        requests=[requests[i] for _, i in members],
        edit_steps=[step for step, _ in members],
        scored_after=[step + 1 for step, _ in members],
        n_edits_applied=[spec.step_edits(step).stop for step, _ in members],
        edits_per_step=spec.edits_per_step,
    )


def _at_point(spec: CampaignSpec, requests: list[EditRequest], step: int, chunk: int) -> EvalTask:
    """Chunk `chunk` (of `evaluation.chunk` records) of all records edited up to `step`,
    scored after it; the first chunk also measures held-out perplexity."""
    applied = spec.step_edits(step).stop
    size = spec.evaluation.chunk
    positions = range(chunk * size, min((chunk + 1) * size, applied))
    sampled = set(fluency_sample(requests[:applied], spec.evaluation.fluency_records))
    chosen = [requests[i] for i in positions]
    return EvalTask(
        protocol="final" if applied == spec.n_edits else "retention",
        requests=chosen,
        edit_steps=[i // spec.edits_per_step for i in positions],
        scored_after=[step + 1] * len(chosen),
        n_edits_applied=[applied] * len(chosen),
        edits_per_step=spec.edits_per_step,
        perplexity=chunk == 0,
        fluency_case_ids=[r.case_id for r in chosen if r.case_id in sampled],
    )


def fluency_sample(requests: list[EditRequest], n: int) -> list[int]:
    """case_ids of `n` records, evenly spaced among those with generation prompts."""
    candidates = [r.case_id for r in requests if r.generation_prompts]
    n = min(n, len(candidates))
    return [candidates[j * len(candidates) // n] for j in range(n)]
