"""One campaign's shards run on its editor actor: `ShardRun.run(shard)` is one attempt.

`ShardRun` holds what every shard of a campaign shares (the spec, the campaign directory
and its state, the requests, the evaluator pool, the progress callback) and the editor
actor with its health monitor, which `place_editor` replaces when the driver moves the
editor (to another shard's checkpoint, or after it died). An attempt at a shard reads top
to bottom in `run`: start the attempt; per step, the checked edit step (with the periodic
health checks when due) and the evaluation tasks due after it; then the shard's rows, its
edit log and checkpoint, and its end state (done or stopped; later shards stale when its
weights changed).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import ray

from seqedit.pipeline.campaign_dir.parts import clear_attempt, write_part
from seqedit.pipeline.campaign_dir.state import CampaignState, ShardState, now
from seqedit.pipeline.run.actors import start_editor
from seqedit.pipeline.run.eval_plan import crossed, due_tasks
from seqedit.pipeline.run.eval_pool import EvalPool
from seqedit.pipeline.run.health_steps import (
    checked_step,
    heldout_texts,
    needs_undo,
    probe_prompts,
    rebuild_window,
    retention_sample,
)
from seqedit.schemas.campaign import CampaignSpec
from seqedit.schemas.requests import EditRequest
from seqedit.schemas.tables import EditRow, HealthRow
from seqedit.storage import Location
from seqedit.workers.edit_log import read_edit_log, write_edit_log
from seqedit.workers.evaluator import EvalResult
from seqedit.workers.health import HealthMonitor

log = logging.getLogger(__name__)

ProgressCallback = Callable[[int, int], None]
"""Called as progress(steps_done, steps_total) after every edit."""

EvalTag = tuple[int, int, int]
"""Where a task's rows go: (shard, attempt, part)."""


def editlog_path(campaign_dir: Location, shard: int) -> Location:
    """Where the edit log of shard `shard` is kept."""
    return campaign_dir / "editlog" / f"shard={shard}.safetensors"


def checkpoint_path(campaign_dir: Location, shard: int) -> Location:
    """Where the editor's state after shard `shard` is kept."""
    return campaign_dir / "checkpoints" / f"shard={shard}.safetensors"


def write_results(
    root: Location, state: CampaignState, results: list[tuple[EvalTag, EvalResult]]
) -> None:
    """Write each result's rows as parts of its shard attempt's partitions; results of an
    attempt that has since been replaced (the shard ran again) are dropped."""
    for (shard, attempt, part), result in results:
        if state.shards[shard].attempt != attempt:
            log.info("dropping evaluation rows of shard %d attempt %d (superseded)", shard, attempt)
            continue
        if result.rows:
            write_part(root, "evals", shard, attempt, part, result.rows)
        if result.model_rows:
            write_part(root, "model_evals", shard, attempt, part, result.model_rows)


@dataclass
class _Attempt:
    """What one attempt at a shard gathers before it writes the shard."""

    shard: ShardState
    node: str  # the Ray node of the editor, on every edit row
    previous_fingerprint: str | None  # the shard's weights when it last ran
    edit_rows: list[EditRow] = field(default_factory=list)
    health_rows: list[HealthRow] = field(default_factory=list)
    stopped: str | None = None  # why a health check stopped the campaign, once one did


@dataclass
class ShardRun:
    """The shards of one campaign, run in order on one editor actor at a time."""

    spec: CampaignSpec
    root: Location
    state: CampaignState
    requests: list[EditRequest]
    pool: EvalPool
    progress: ProgressCallback | None = None
    editor: Any = None  # the editor actor (a Ray actor handle), once started
    monitor: HealthMonitor | None = None  # the per-edit health checks of that editor

    # --- the editor ----------------------------------------------------------------------

    def seed_log(self, first: int) -> None:
        """Give the pool the edit log of the steps before shard `first`: from the edit-log
        files of the done shards before it (the log of later steps is forgotten)."""
        shards = self.state.shards
        start = shards[first].start if first < len(shards) else shards[-1].stop
        self.pool.rewind(start)
        for shard in shards[:first]:
            if shard.stop <= self.pool.log_stop:
                continue
            if shard.status != "done":
                break
            tensors = read_edit_log(editlog_path(self.root, shard.index))
            self.pool.add_segment(shard.start, shard.stop, ray.put(tensors))

    def place_editor(self, first_shard: int) -> None:
        """A new editor actor (the old one, if any, is killed) placed before `first_shard`
        (at the checkpoint of the shard before it), a health monitor whose trend window is
        where it was there, and the evaluators' edit log cut back to there."""
        spec, root = self.spec, self.root
        self.close()
        self.seed_log(first_shard)
        self.editor = editor = start_editor(spec, keep_undo=needs_undo(spec.health))
        description = ray.get(editor.describe.remote())
        (root / "method.json").write_text(json.dumps(description, indent=2))
        if spec.health.every:  # on the base model, before the checkpoint moves it along
            probes = probe_prompts(self.requests, spec.health.n_probes)
            ray.get(editor.set_probes.remote(probes, heldout_texts(spec.health)))
        if first_shard > 0:
            before = self.state.shards[first_shard - 1]
            path = checkpoint_path(root, before.index)
            ray.get(editor.load_checkpoint.remote(str(path), before.weights_fingerprint))
            log.info("starting shard %d from the checkpoint of shard %d", first_shard, before.index)
        self.monitor = rebuild_window(spec, root, self.state, first_shard)

    def close(self) -> None:
        """Stop the editor actor, if one runs."""
        if self.editor is not None:
            ray.kill(self.editor)
            self.editor = None

    # --- one attempt at a shard ----------------------------------------------------------

    def run(self, shard: ShardState) -> None:
        """Run `shard` once on the current editor, which stands at the shard's start: its
        steps (until a health check stops the campaign), then write what it made. An
        error marks the shard failed; a dead editor (`ACTOR_DIED`) is the driver's to
        retry."""
        attempt = self._start_attempt(shard)
        try:
            for step in range(shard.start, shard.stop):
                self._edit_step(attempt, step)
                self._submit_due_evaluations(attempt, step)
                write_results(self.root, self.state, self.pool.collect())
                if attempt.stopped:
                    break
            self._write_shard(attempt)
        except Exception as exc:
            shard.status, shard.error, shard.finished_at = "failed", repr(exc), now()
            raise
        self._end_attempt(attempt)

    def _start_attempt(self, shard: ShardState) -> _Attempt:
        """A new attempt number (unless the shard never ran), its partitions emptied, and
        the shard marked running on this editor."""
        if shard.status != "pending":
            shard.attempt += 1
        previous_fingerprint = shard.weights_fingerprint
        clear_attempt(self.root, shard.index, shard.attempt)
        shard.status, shard.started_at, shard.error = "running", now(), None
        shard.steps_done = 0
        shard.worker_pid = ray.get(self.editor.pid.remote())
        node = ray.get(self.editor.node_id.remote())
        self.state.save(self.root)
        return _Attempt(shard, node, previous_fingerprint)

    def _edit_step(self, attempt: _Attempt, step: int) -> None:
        """Edit step `step` with its per-edit checks, then the periodic checks when due;
        a check whose policy is `stop` stops the attempt after this step."""
        spec, shard = self.spec, attempt.shard
        positions = spec.step_edits(step)
        batch = [self.requests[i] for i in positions]
        assert self.monitor is not None  # set with the editor
        rows, checks = checked_step(self.editor, batch, step, self.monitor, spec.health)
        attempt.edit_rows.extend(row.model_copy(update={"node": attempt.node}) for row in rows)
        attempt.health_rows.extend(checks)
        shard.steps_done = step + 1 - shard.start
        self.state.save(self.root)  # atomic; `seqedit status` reads it while we run
        applied = positions.stop  # requests edited so far (rolled back ones included)
        if self.progress is not None:
            self.progress(applied, spec.n_edits)
        stops = [c for c in checks if c.action == "stop"]
        if not stops and crossed(spec.health.every, positions.start, applied):
            periodic = self._periodic_health(rows[-1], applied)
            attempt.health_rows.extend(periodic)
            stops = [c for c in periodic if c.action == "stop"]
        if stops:
            attempt.stopped = f"health stop after step {step}: " + "; ".join(
                f"{c.check_name} {c.value:.4g} (limit {c.threshold})" for c in stops
            )

    def _periodic_health(self, last: EditRow, applied: int) -> list[HealthRow]:
        """The periodic checks after `applied` requests, `last` the latest edit row."""
        sample = [self.requests[i] for i in retention_sample(applied, self.spec.health.n_retention)]
        started = time.perf_counter()
        metrics = ray.get(self.editor.periodic_health.remote(sample))
        took = time.perf_counter() - started
        assert self.monitor is not None
        return self.monitor.periodic(last, metrics, seconds=took)

    def _submit_due_evaluations(self, attempt: _Attempt, step: int) -> None:
        """Hand the evaluation tasks due after `step` to the pool, with the log segment
        they need; the evaluators score them while the editor goes on."""
        shard = attempt.shard
        tasks = due_tasks(self.spec, self.requests, step, shard_start=shard.start,
                          shard_stop=shard.stop, stopped=attempt.stopped is not None)  # fmt: skip
        if not tasks:
            return
        pool = self.pool
        pool.add_segment(pool.log_stop, step + 1, self.editor.edit_log_since.remote(pool.log_stop))
        for part, task in tasks:
            pool.submit(task, (shard.index, shard.attempt, part))

    def _write_shard(self, attempt: _Attempt) -> None:
        """The shard's edit and health rows, the rest of its log for the evaluators, its
        edit-log file and its checkpoint (whose weights fingerprint the shard records)."""
        root, shard, pool, editor = self.root, attempt.shard, self.pool, self.editor
        for table, rows in (("edits", attempt.edit_rows), ("health", attempt.health_rows)):
            if rows:
                write_part(root, table, shard.index, shard.attempt, 0, rows)
        ran_to = shard.start + shard.steps_done
        if pool.log_stop < ran_to:
            pool.add_segment(pool.log_stop, ran_to, editor.edit_log_since.remote(pool.log_stop))
        tensors = ray.get(editor.take_edit_log.remote())
        write_edit_log(editlog_path(root, shard.index), tensors, campaign=self.spec.name)
        shard.weights_fingerprint = ray.get(
            editor.save_checkpoint.remote(str(checkpoint_path(root, shard.index)))
        )

    def _end_attempt(self, attempt: _Attempt) -> None:
        """Mark the shard done (or stopped); if its weights changed since it last ran, the
        shards after it are stale."""
        shard = attempt.shard
        shard.status = "stopped" if attempt.stopped else "done"
        shard.error, shard.done_attempt, shard.finished_at = attempt.stopped, shard.attempt, now()
        if attempt.previous_fingerprint not in (None, shard.weights_fingerprint):
            _mark_later_stale(self.state, shard.index)
        self.state.save(self.root)


def _mark_later_stale(state: CampaignState, index: int) -> None:
    """Shard `index` was rerun and its weights changed: the shards after it started from
    the old weights, so their rows and checkpoints no longer describe this campaign."""
    for later in state.shards[index + 1 :]:
        if later.status != "pending":
            log.warning("shard %d is stale after shard %d changed; pending again", later.index,
                        index)  # fmt: skip
            later.status, later.done_attempt, later.weights_fingerprint = "pending", None, None
            later.error = f"stale: shard {index} was rerun with different weights"
            later.attempt += 1
