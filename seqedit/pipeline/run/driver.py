"""The campaign driver: plans shards, runs the editor actor, feeds the evaluator pool.

It plans the campaign into shards of consecutive steps, starts a SequentialEditor actor
(`actors.EditorActor`), feeds it the requests in order, hands evaluation to the evaluator
pool (`eval_pool`), writes each shard's rows as Parquet parts, and records progress in the
campaign state so `seqedit query` can read the finished shards meanwhile.
"""

from __future__ import annotations

import itertools
import json
import logging
import time
from collections.abc import Callable, Collection

import ray
import torch
import yaml

from seqedit.methods.config import validate_config
from seqedit.methods.registry import get_method
from seqedit.pipeline.campaign_dir.lock import driver_lock
from seqedit.pipeline.campaign_dir.parts import clear_attempt, partition_dir, write_part
from seqedit.pipeline.campaign_dir.state import CampaignState, CampaignStatus, ShardState, now
from seqedit.pipeline.run.actors import ACTOR_DIED, EditorActor, actor_options, device_for
from seqedit.pipeline.run.campaign_stats import ensure_campaign_stats
from seqedit.pipeline.run.eval_plan import build_task, crossed, due_tasks, shard_plan
from seqedit.pipeline.run.eval_pool import EvalPool
from seqedit.pipeline.run.health_steps import (
    checked_step,
    heldout_texts,
    needs_undo,
    probe_prompts,
    rebuild_window,
    retention_sample,
)
from seqedit.pipeline.run.ray_init import ensure_ray
from seqedit.schemas.campaign import CampaignSpec
from seqedit.schemas.loaders import load_requests, write_quarantine
from seqedit.schemas.requests import EditRequest
from seqedit.schemas.tables import EditRow, HealthRow
from seqedit.storage import Location, Where, location
from seqedit.workers.evaluator import EvalResult, EvalTask
from seqedit.workers.health import HealthMonitor
from seqedit.workers.tensor_files import read_safetensors, write_safetensors

log = logging.getLogger(__name__)

ProgressCallback = Callable[[int, int], None]
"""Called as progress(steps_done, steps_total) after every edit."""


class CampaignDirError(ValueError):
    """A campaign directory that holds a different campaign."""


def plan_shards(n_steps: int, shard_size: int | None) -> list[ShardState]:
    """Contiguous step ranges [start, stop) covering steps 0..n_steps-1."""
    size = shard_size or n_steps
    return [
        ShardState(index=i, start=start, stop=min(start + size, n_steps))
        for i, start in enumerate(range(0, n_steps, size))
    ]


def select_requests(spec: CampaignSpec, campaign_dir: Location) -> list[EditRequest]:
    """The requests the campaign edits, in order; rejected records go to rejects.jsonl."""
    loaded = load_requests(
        spec.dataset.path, spec.dataset.format, quarantine=spec.dataset.quarantine
    )
    if loaded.rejected:
        write_quarantine(loaded, campaign_dir / "rejects.jsonl")
        log.warning(
            "%d records rejected, see %s", len(loaded.rejected), campaign_dir / "rejects.jsonl"
        )
    pool = loaded.requests
    if spec.dataset.order == "shuffled":
        generator = torch.Generator().manual_seed(spec.dataset.shuffle_seed)
        pool = [pool[i] for i in torch.randperm(len(pool), generator=generator).tolist()]
    chosen = pool[spec.dataset.offset : spec.dataset.offset + spec.n_edits]
    if len(chosen) < spec.n_edits:
        raise ValueError(
            f"{spec.dataset.path}: n_edits is {spec.n_edits} but only {len(chosen)} valid "
            f"records remain after offset {spec.dataset.offset}"
        )
    return chosen


def prepare_dir(spec: CampaignSpec, campaign_dir: Location) -> CampaignState:
    """Create the campaign dir with its frozen spec, or refuse one holding another spec."""
    campaign_dir.mkdir()
    spec_file = campaign_dir / "spec.yaml"
    if spec_file.exists():
        state = CampaignState.load(campaign_dir)
        if state.spec_hash != spec.spec_hash():
            raise CampaignDirError(
                f"{campaign_dir}: holds campaign with spec hash {state.spec_hash[:12]}, "
                f"not {spec.spec_hash()[:12]}; use another --out directory"
            )
        return state
    frozen = {"spec_hash": spec.spec_hash(), **spec.model_dump(mode="json")}
    spec_file.write_text(yaml.safe_dump(frozen, sort_keys=False))
    state = CampaignState(
        campaign=spec.name,
        spec_hash=spec.spec_hash(),
        shards=plan_shards(spec.n_steps, spec.shard_size),
    )
    state.save(campaign_dir)
    return state


def run_campaign(
    spec: CampaignSpec,
    campaign_dir: Where,
    *,
    progress: ProgressCallback | None = None,
    shards: Collection[int] | None = None,
) -> CampaignState:
    """Run the campaign's shards in order on one editor actor: every shard not done yet,
    or (`shards`) exactly the shards named, done or not, which then need every shard
    before the first of them done. A rerun shard whose weights come out different makes
    the done shards after it stale (pending again). One driver at a time per directory."""
    root = location(campaign_dir)
    method = get_method(spec.method)  # unknown names fail here, before anything is written
    validate_config(method.config_cls, spec.hparams, where=f"campaign {spec.name!r} hparams")
    if spec.edits_per_step > 1 and method.edit_batch is None:
        raise ValueError(
            f"campaign {spec.name!r}: edits_per_step is {spec.edits_per_step}, but method "
            f"{method.name!r} edits one request at a time (batched: memit, alphaedit)"
        )
    root.mkdir()
    with driver_lock(root):
        state = prepare_dir(spec, root)  # as the last driver left it
        todo = _select_shards(state, shards)
        first = todo[0] if todo else len(state.shards)
        requests = select_requests(spec, root)
        missing = missing_evals(spec, root, state, requests, before=first)
        if not todo and not missing:
            return state
        ensure_ray()
        _check_resources(spec)
        ensure_campaign_stats(spec)  # before an editor loads them
        pool = EvalPool(spec, heldout_texts(spec.health))
        editor = None
        try:
            _seed_log(pool, root, state, first)
            for tag, task in missing:  # rows a past driver did not live to write
                pool.submit(task, tag)
            if todo:
                editor, monitor = _start_editor(spec, root, state, requests, pool, todo[0])
                state.status = "running"
                state.save(root)
            for previous, index in zip([first - 1, *todo], todo, strict=False):
                shard = state.shards[index]
                _check_predecessor_done(root, state, index)
                if index != previous + 1:  # the editor stands after another shard
                    ray.kill(editor)
                    editor, monitor = _start_editor(spec, root, state, requests, pool, index)
                for tries in itertools.count(1):
                    try:
                        _run_shard(
                            spec, root, state, shard, editor, requests, progress, monitor, pool
                        )
                        break
                    except ACTOR_DIED as exc:
                        if tries >= spec.max_attempts:
                            raise
                        log.warning("shard %d: editor died (%s); retrying", shard.index, exc)
                        ray.kill(editor)
                        editor, monitor = _start_editor(spec, root, state, requests, pool, index)
                if shard.status == "stopped":
                    break
            write_results(root, state, pool.drain())
            state.status = _overall_status(state)
        except BaseException:
            state.status = "failed"
            raise
        finally:
            state.save(root)
            if editor is not None:
                ray.kill(editor)
            pool.close()
    return state


EvalTag = tuple[int, int, int]
"""Where a task's rows go: (shard, attempt, part)."""


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


def missing_evals(
    spec: CampaignSpec,
    root: Location,
    state: CampaignState,
    requests: list[EditRequest],
    *,
    before: int,
) -> list[tuple[EvalTag, EvalTask]]:
    """The planned evaluation tasks of done shards before shard `before` whose rows were
    never written (a driver died while they ran): (tag, task) to submit again."""
    missing: list[tuple[EvalTag, EvalTask]] = []
    for shard in state.shards[:before]:
        if shard.status != "done":
            break
        attempt = shard.done_attempt if shard.done_attempt is not None else shard.attempt
        folder = partition_dir(root, "evals", shard.index, attempt)
        for planned in shard_plan(spec, shard.start, shard.stop):
            if not (folder / f"part-{planned.part:05d}.parquet").exists():
                task = build_task(spec, requests, planned)
                missing.append(((shard.index, attempt, planned.part), task))
    return missing


def _check_resources(spec: CampaignSpec) -> None:
    """Refuse a campaign whose editor and evaluators cannot all be placed at once (their
    actors would wait for resources forever)."""
    evaluation = spec.evaluation
    available = ray.cluster_resources()
    for resource, editor_needs, each in (
        ("CPU", spec.resources.num_cpus, evaluation.resources.num_cpus),
        ("GPU", spec.resources.num_gpus, evaluation.resources.num_gpus),
    ):
        needed = editor_needs + evaluation.actors * each
        if needed > available.get(resource, 0) + 1e-9:
            raise ValueError(
                f"campaign {spec.name!r}: the editor ({editor_needs} {resource}) and "
                f"{evaluation.actors} evaluator(s) ({each} {resource} each) need {needed:g} "
                f"{resource}, the cluster has {available.get(resource, 0):g}; lower "
                f"evaluation.actors or evaluation.resources.num_{resource.lower()}s"
            )


def _seed_log(pool: EvalPool, root: Location, state: CampaignState, first: int) -> None:
    """Give the pool the edit log of the steps before shard `first`: from the edit-log
    files of the done shards before it (the log of later steps is forgotten)."""
    start = state.shards[first].start if first < len(state.shards) else state.shards[-1].stop
    pool.rewind(start)
    for shard in state.shards[:first]:
        if shard.stop <= pool.log_stop:
            continue
        if shard.status != "done":
            break
        tensors, _ = read_safetensors(editlog_path(root, shard.index))
        pool.add_segment(shard.start, shard.stop, ray.put(tensors))


def editlog_path(campaign_dir: Location, shard: int) -> Location:
    """Where the edit log of shard `shard` is kept."""
    return campaign_dir / "editlog" / f"shard={shard}.safetensors"


def _overall_status(state: CampaignState) -> CampaignStatus:
    statuses = {s.status for s in state.shards}
    if "stopped" in statuses:
        return "stopped"
    return "done" if statuses == {"done"} else "pending"


def _select_shards(state: CampaignState, chosen: Collection[int] | None) -> list[int]:
    """Indices to run, ascending: every shard not done (after a health stop: none), or
    exactly `chosen`."""
    if chosen is None:
        if any(s.status == "stopped" for s in state.shards):
            return []  # stopped by a health policy: running on would stop again
        return [s.index for s in state.shards if s.status != "done"]
    known = range(len(state.shards))
    unknown = sorted(set(chosen) - set(known))
    if unknown:
        raise ValueError(f"no shard {unknown[0]}: the campaign has shards 0..{len(known) - 1}")
    return sorted(set(chosen))


def _check_predecessor_done(root: Location, state: CampaignState, index: int) -> None:
    if index > 0 and state.shards[index - 1].status != "done":
        before = state.shards[index - 1]
        raise ValueError(
            f"{root}: shard {index} starts from the checkpoint of shard {index - 1}, which is "
            f"{before.status}; rerun shard {index - 1} first (or `seqedit rerun` to continue)"
        )


def _start_editor(
    spec: CampaignSpec,
    root: Location,
    state: CampaignState,
    requests: list[EditRequest],
    pool: EvalPool,
    first_shard: int,
) -> tuple[ray.actor.ActorHandle, HealthMonitor]:
    """A new editor actor placed before `first_shard` (at the checkpoint of the shard
    before it), a health monitor whose trend window is where it was there, and the
    evaluators' edit log cut back to there."""
    _seed_log(pool, root, state, first_shard)
    actor_cls = ray.remote(EditorActor).options(**actor_options(spec.resources))
    editor = actor_cls.remote(
        spec.model,
        spec.method,
        spec.hparams,
        stats_dir=spec.stats,
        campaign=spec.name,
        seed=spec.seed,
        torch_threads=spec.resources.torch_threads,
        device=device_for(spec.resources),
        keep_undo=needs_undo(spec.health),
        retry_factor=spec.health.retry_steps_factor,
    )
    description = ray.get(editor.describe.remote())
    (root / "method.json").write_text(json.dumps(description, indent=2))
    if spec.health.every:  # on the base model, before the checkpoint moves it along
        probes = probe_prompts(requests, spec.health.n_probes)
        ray.get(editor.set_probes.remote(probes, heldout_texts(spec.health)))
    if first_shard > 0:
        before = state.shards[first_shard - 1]
        path = checkpoint_path(root, before.index)
        ray.get(editor.load_checkpoint.remote(str(path), before.weights_fingerprint))
        log.info("starting shard %d from the checkpoint of shard %d", first_shard, before.index)
    return editor, rebuild_window(spec, root, state, first_shard)


def checkpoint_path(campaign_dir: Location, shard: int) -> Location:
    """Where the editor's state after shard `shard` is kept."""
    return campaign_dir / "checkpoints" / f"shard={shard}.safetensors"


def _run_shard(
    spec: CampaignSpec,
    root: Location,
    state: CampaignState,
    shard: ShardState,
    editor: ray.actor.ActorHandle,
    requests: list[EditRequest],
    progress: ProgressCallback | None,
    monitor: HealthMonitor,
    pool: EvalPool,
) -> None:
    if shard.status != "pending":
        shard.attempt += 1
    previous_fingerprint = shard.weights_fingerprint
    clear_attempt(root, shard.index, shard.attempt)
    shard.status, shard.started_at, shard.error = "running", now(), None
    shard.steps_done = 0
    shard.worker_pid = ray.get(editor.pid.remote())
    node = ray.get(editor.node_id.remote())
    state.save(root)
    edit_rows: list[EditRow] = []
    health_rows: list[HealthRow] = []
    stopped: str | None = None
    try:
        for step in range(shard.start, shard.stop):
            positions = spec.step_edits(step)
            batch = [requests[i] for i in positions]
            rows, checks = checked_step(editor, batch, step, monitor, spec.health)
            edit_rows.extend(row.model_copy(update={"node": node}) for row in rows)
            health_rows.extend(checks)
            shard.steps_done = step + 1 - shard.start
            state.save(root)  # atomic; `seqedit status` reads it while we run
            applied = positions.stop  # requests edited so far (rolled back ones included)
            if progress is not None:
                progress(applied, spec.n_edits)
            stops = [c for c in checks if c.action == "stop"]
            if not stops and crossed(spec.health.every, positions.start, applied):
                sample = [requests[i] for i in retention_sample(applied, spec.health.n_retention)]
                started = time.perf_counter()
                metrics = ray.get(editor.periodic_health.remote(sample))
                took = time.perf_counter() - started
                periodic = monitor.periodic(rows[-1], metrics, seconds=took)
                health_rows.extend(periodic)
                stops = [c for c in periodic if c.action == "stop"]
            if stops:
                stopped = f"health stop after step {step}: " + "; ".join(
                    f"{c.check_name} {c.value:.4g} (limit {c.threshold})" for c in stops
                )
            tasks = due_tasks(
                spec,
                requests,
                step,
                shard_start=shard.start,
                shard_stop=shard.stop,
                stopped=stopped is not None,
            )
            if tasks:  # the evaluators score them while the editor goes on
                pool.add_segment(
                    pool.log_stop, step + 1, editor.edit_log_since.remote(pool.log_stop)
                )
                for part, task in tasks:
                    pool.submit(task, (shard.index, shard.attempt, part))
            write_results(root, state, pool.collect())
            if stopped:
                break
        for table, rows in (("edits", edit_rows), ("health", health_rows)):
            if rows:
                write_part(root, table, shard.index, shard.attempt, 0, rows)
        ran_to = shard.start + shard.steps_done
        if pool.log_stop < ran_to:
            pool.add_segment(pool.log_stop, ran_to, editor.edit_log_since.remote(pool.log_stop))
        tensors = ray.get(editor.take_edit_log.remote())
        write_safetensors(editlog_path(root, shard.index), tensors, {"campaign": spec.name})
        shard.weights_fingerprint = ray.get(
            editor.save_checkpoint.remote(str(checkpoint_path(root, shard.index)))
        )
    except Exception as exc:
        shard.status, shard.error, shard.finished_at = "failed", repr(exc), now()
        raise
    shard.status = "stopped" if stopped else "done"
    shard.error, shard.done_attempt, shard.finished_at = stopped, shard.attempt, now()
    if previous_fingerprint not in (None, shard.weights_fingerprint):
        _mark_later_stale(state, shard.index)
    state.save(root)


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
