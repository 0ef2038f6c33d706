"""The campaign driver: plans shards, runs them in order, retries a shard whose editor died.

It plans the campaign into shards of consecutive steps, freezes the spec in the campaign
directory, holds the driver lock, and runs the shards to do on one editor actor
(`shard_run.ShardRun`: one attempt at a shard, with its evaluation handed to the evaluator
pool, `eval_pool`). Each shard's rows are Parquet parts and the campaign state records
progress, so `seqedit query` can read the finished shards meanwhile.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Collection

import ray
import torch
import yaml

from seqedit.errors import SeqeditError
from seqedit.methods.config import validate_config
from seqedit.methods.registry import get_method, registered_methods
from seqedit.pipeline.campaign_dir.lock import driver_lock
from seqedit.pipeline.campaign_dir.parts import partition_dir
from seqedit.pipeline.campaign_dir.state import CampaignState, CampaignStatus, ShardState
from seqedit.pipeline.run.actors import ACTOR_DIED
from seqedit.pipeline.run.campaign_stats import ensure_campaign_stats
from seqedit.pipeline.run.eval_plan import build_task, shard_plan
from seqedit.pipeline.run.eval_pool import EvalPool
from seqedit.pipeline.run.health_steps import heldout_texts
from seqedit.pipeline.run.ray_init import ensure_ray
from seqedit.pipeline.run.shard_run import EvalTag, ProgressCallback, ShardRun, write_results
from seqedit.schemas.campaign import CampaignSpec, SpecError
from seqedit.schemas.loaders import load_requests, write_quarantine
from seqedit.schemas.requests import EditRequest
from seqedit.storage import Location, Where, location
from seqedit.workers.evaluator import EvalTask

log = logging.getLogger(__name__)


class CampaignDirError(SeqeditError, ValueError):
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
        raise SpecError(
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
    if spec.edits_per_step > 1 and not method.batched:
        batched = ", ".join(sorted(m.name for m in registered_methods().values() if m.batched))
        raise SpecError(
            f"campaign {spec.name!r}: edits_per_step is {spec.edits_per_step}, but method "
            f"{method.name!r} edits one request at a time (batched: {batched})"
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
        ensure_campaign_stats(spec, requests)  # before an editor loads them
        pool = EvalPool(spec, heldout_texts(spec.health))
        run = ShardRun(spec, root, state, requests, pool, progress)
        try:
            run.seed_log(first)
            for tag, task in missing:  # rows a past driver did not live to write
                pool.submit(task, tag)
            if todo:
                run.place_editor(todo[0])
                state.status = "running"
                state.save(root)
            for previous, index in zip([first - 1, *todo], todo, strict=False):
                _check_predecessor_done(root, state, index)
                if index != previous + 1:  # the editor stands after another shard
                    run.place_editor(index)
                _run_retrying(run, state.shards[index])
                if state.shards[index].status == "stopped":
                    break
            write_results(root, state, pool.drain())
            state.status = _overall_status(state)
        except BaseException:
            state.status = "failed"
            raise
        finally:
            state.save(root)
            run.close()
            pool.close()
    return state


def _run_retrying(run: ShardRun, shard: ShardState) -> None:
    """Run `shard`; when its editor process dies (killed, out of memory), run it again on
    a new editor from the same checkpoint, `max_attempts` times in all."""
    for tries in itertools.count(1):
        try:
            run.run(shard)
            return
        except ACTOR_DIED as exc:
            if tries >= run.spec.max_attempts:
                raise
            log.warning("shard %d: editor died (%s); retrying", shard.index, exc)
            run.place_editor(shard.index)


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
            raise SpecError(
                f"campaign {spec.name!r}: the editor ({editor_needs} {resource}) and "
                f"{evaluation.actors} evaluator(s) ({each} {resource} each) need {needed:g} "
                f"{resource}, the cluster has {available.get(resource, 0):g}; lower "
                f"evaluation.actors or evaluation.resources.num_{resource.lower()}s"
            )


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
        last = len(known) - 1
        raise CampaignDirError(f"no shard {unknown[0]}: the campaign has shards 0..{last}")
    return sorted(set(chosen))


def _check_predecessor_done(root: Location, state: CampaignState, index: int) -> None:
    if index > 0 and state.shards[index - 1].status != "done":
        before = state.shards[index - 1]
        raise CampaignDirError(
            f"{root}: shard {index} starts from the checkpoint of shard {index - 1}, which is "
            f"{before.status}; rerun shard {index - 1} first (or `seqedit rerun` to continue)"
        )
