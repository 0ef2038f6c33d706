"""The campaign driver: the one place that talks to Ray.

It plans the campaign into shards of consecutive steps, starts a SequentialEditor actor,
feeds it the requests in order, writes each shard's rows as Parquet parts, and records
progress in the campaign state so `seqedit query` can read the finished shards meanwhile.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

import ray
import torch
import yaml

from seqedit.files import write_text_atomic
from seqedit.methods.config import validate_config
from seqedit.methods.registry import get_method
from seqedit.pipeline.state import CampaignState, ShardState, now
from seqedit.pipeline.store import clear_attempt, write_part
from seqedit.schemas.campaign import CampaignSpec
from seqedit.schemas.loaders import load_requests, write_quarantine
from seqedit.schemas.requests import EditRequest
from seqedit.schemas.tables import EditRow, EvalRow, HealthRow
from seqedit.workers.editor import SequentialEditor
from seqedit.workers.health import HealthMonitor
from seqedit.workers.health import action as health_action
from seqedit.workers.tensor_files import write_safetensors

log = logging.getLogger(__name__)

ProgressCallback = Callable[[int, int], None]
"""Called as progress(steps_done, steps_total) after every edit."""


class CampaignDirError(ValueError):
    """A campaign directory that holds a different campaign."""


def plan_shards(n_edits: int, shard_size: int | None) -> list[ShardState]:
    """Contiguous step ranges [start, stop) covering 0..n_edits-1."""
    size = shard_size or n_edits
    return [
        ShardState(index=i, start=start, stop=min(start + size, n_edits))
        for i, start in enumerate(range(0, n_edits, size))
    ]


def select_requests(spec: CampaignSpec, campaign_dir: Path) -> list[EditRequest]:
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


def prepare_dir(spec: CampaignSpec, campaign_dir: Path) -> CampaignState:
    """Create the campaign dir with its frozen spec, or refuse one holding another spec."""
    campaign_dir.mkdir(parents=True, exist_ok=True)
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
    write_text_atomic(spec_file, yaml.safe_dump(frozen, sort_keys=False))
    state = CampaignState(
        campaign=spec.name,
        spec_hash=spec.spec_hash(),
        shards=plan_shards(spec.n_edits, spec.shard_size),
    )
    state.save(campaign_dir)
    return state


def _ensure_ray() -> None:
    """Join the cluster at RAY_ADDRESS, or start an embedded local Ray instance."""
    if not ray.is_initialized():
        address = os.environ.get("RAY_ADDRESS") or None
        ray.init(
            address=address,
            include_dashboard=False,
            log_to_driver=False,
            # the embedded instance is private to this process: keep its start-up quiet
            logging_level=logging.WARNING if address else logging.ERROR,
        )


def run_campaign(
    spec: CampaignSpec,
    campaign_dir: str | Path,
    *,
    progress: ProgressCallback | None = None,
) -> CampaignState:
    """Run every unfinished shard of the campaign in order on one editor actor."""
    root = Path(campaign_dir)
    method = get_method(spec.method)  # unknown names fail here, before anything is written
    validate_config(method.config_cls, spec.hparams, where=f"campaign {spec.name!r} hparams")
    state = prepare_dir(spec, root)
    requests = select_requests(spec, root)
    _ensure_ray()
    editor = _start_editor(spec, root, state, requests)
    monitor = HealthMonitor(spec.health, spec.name)
    state.status = "running"
    state.save(root)
    try:
        for shard in state.shards:
            if shard.status == "done":
                continue
            while True:
                try:
                    _run_shard(spec, root, state, shard, editor, requests, progress, monitor)
                    break
                except EDITOR_DIED as exc:
                    if shard.attempt + 1 >= spec.max_attempts:
                        raise
                    log.warning("shard %d: editor died (%s); retrying", shard.index, exc)
                    ray.kill(editor)
                    editor = _start_editor(spec, root, state, requests)
                    monitor = HealthMonitor(spec.health, spec.name)
            if shard.status == "stopped":
                break
        state.status = "stopped" if any(s.status == "stopped" for s in state.shards) else "done"
    except BaseException:
        state.status = "failed"
        raise
    finally:
        state.save(root)
        ray.kill(editor)
    return state


EDITOR_DIED = (
    ray.exceptions.RayActorError,
    ray.exceptions.WorkerCrashedError,
    ray.exceptions.ObjectLostError,
)
"""Errors of a lost editor process (killed, out of memory, node gone): worth a retry."""


def _start_editor(
    spec: CampaignSpec, root: Path, state: CampaignState, requests: list[EditRequest]
) -> ray.actor.ActorHandle:
    """A new editor actor, placed where the campaign stands (see `_resume`)."""
    actor_cls = ray.remote(SequentialEditor).options(
        num_cpus=spec.resources.num_cpus, num_gpus=spec.resources.num_gpus, max_restarts=0
    )
    editor = actor_cls.remote(
        spec.model,
        spec.method,
        spec.hparams,
        stats_dir=spec.stats,
        campaign=spec.name,
        seed=spec.seed,
        torch_threads=spec.resources.torch_threads,
        device="cuda" if spec.resources.num_gpus > 0 else "cpu",
        keep_undo=ROLLBACK & {spec.health.on_unverified, spec.health.on_update_norm,
                              spec.health.on_trend} != set(),
    )  # fmt: skip
    description = ray.get(editor.describe.remote())
    write_text_atomic(root / "method.json", json.dumps(description, indent=2))
    if spec.health.every:  # on the base model, before `_resume` moves it along
        ray.get(editor.set_probes.remote(probe_prompts(requests, spec.health.n_probes)))
    _resume(root, state, editor)
    return editor


def probe_prompts(requests: list[EditRequest], n: int) -> list[str]:
    """The first `n` distinct neighbourhood prompts of `requests` (facts the edits must not
    change), topped up with rewrite prompts when there are too few."""
    prompts = [nb.prompt for r in requests for nb in r.neighborhood_prompts]
    prompts += [r.filled_prompt for r in requests]
    return list(dict.fromkeys(prompts))[:n]


def retention_sample(applied: int, n: int) -> list[int]:
    """Up to `n` evenly spaced indices of the first `applied` edits, first and last included."""
    if applied <= n:
        return list(range(applied))
    return sorted({round(j * (applied - 1) / (n - 1)) for j in range(n)}) if n > 1 else [0]


def checkpoint_path(campaign_dir: Path, shard: int) -> Path:
    """Where the editor's state after shard `shard` is kept."""
    return campaign_dir / "checkpoints" / f"shard={shard}.safetensors"


ROLLBACK = {"skip", "stop"}
"""Health policies that roll the failing edit back (stop: to the last healthy state)."""


def _resume(root: Path, state: CampaignState, editor: ray.actor.ActorHandle) -> None:
    """Put a fresh editor where the campaign stands: after the last done shard.

    Shards run in order, so the first unfinished shard k resumes from the checkpoint that
    shard k-1 wrote when it was done (its weights fingerprint is checked against state.json).
    """
    pending = [s.index for s in state.shards if s.status != "done"]
    if not pending or pending[0] == 0:
        return
    before = state.shards[pending[0] - 1]
    ray.get(
        editor.load_checkpoint.remote(
            str(checkpoint_path(root, before.index)), before.weights_fingerprint
        )
    )
    log.info("resuming after shard %d from its checkpoint", before.index)


def _run_shard(
    spec: CampaignSpec,
    root: Path,
    state: CampaignState,
    shard: ShardState,
    editor: ray.actor.ActorHandle,
    requests: list[EditRequest],
    progress: ProgressCallback | None,
    monitor: HealthMonitor,
) -> None:
    if shard.status in ("running", "failed", "stopped"):
        shard.attempt += 1
    clear_attempt(root, shard.index, shard.attempt)
    shard.status, shard.started_at, shard.error = "running", now(), None
    shard.steps_done = 0
    shard.worker_pid = ray.get(editor.pid.remote())
    state.save(root)
    edit_rows: list[EditRow] = []
    eval_rows: list[EvalRow] = []
    health_rows: list[HealthRow] = []
    stopped: str | None = None
    try:
        for step in range(shard.start, shard.stop):
            row, checks = _checked_edit(editor, requests[step], step, monitor)
            edit_rows.append(row)
            health_rows.extend(checks)
            shard.steps_done = step + 1 - shard.start
            state.save(root)  # atomic; `seqedit status` reads it while we run
            if progress is not None:
                progress(step + 1, spec.n_edits)
            applied = step + 1
            last = applied == spec.n_edits
            every = spec.health.every
            if every and applied % every == 0 and not any(c.action == "stop" for c in checks):
                sample = [requests[i] for i in retention_sample(applied, spec.health.n_retention)]
                started = time.perf_counter()
                metrics = ray.get(editor.periodic_health.remote(sample))
                checks = monitor.periodic(row, metrics, seconds=time.perf_counter() - started)
                health_rows.extend(checks)
            if any(c.action == "stop" for c in checks):
                failed = [c for c in checks if c.action == "stop"]
                stopped = f"health stop after step {step}: " + "; ".join(
                    f"{c.check_name} {c.value:.4g} (limit {c.threshold})" for c in failed
                )
            if last or stopped or (spec.eval_every and applied % spec.eval_every == 0):
                eval_rows.extend(
                    ray.get(
                        editor.evaluate.remote(
                            requests[:applied],
                            list(range(applied)),
                            protocol="final" if last else "retention",
                            batch_size=spec.eval_batch_size,
                        )
                    )
                )
            if stopped:
                break
        for table, rows in (("edits", edit_rows), ("evals", eval_rows), ("health", health_rows)):
            if rows:
                write_part(root, table, shard.index, shard.attempt, 0, rows)
        tensors = ray.get(editor.take_edit_log.remote())
        write_safetensors(
            root / "editlog" / f"shard={shard.index}.safetensors", tensors, {"campaign": spec.name}
        )
        shard.weights_fingerprint = ray.get(
            editor.save_checkpoint.remote(str(checkpoint_path(root, shard.index)))
        )
    except Exception as exc:
        shard.status, shard.error, shard.finished_at = "failed", repr(exc), now()
        raise
    shard.status = "stopped" if stopped else "done"
    shard.error, shard.done_attempt, shard.finished_at = stopped, shard.attempt, now()
    state.save(root)


def _checked_edit(
    editor: ray.actor.ActorHandle, request: EditRequest, step: int, monitor: HealthMonitor
) -> tuple[EditRow, list[HealthRow]]:
    """Apply one edit, run the health checks; roll it back when a policy says skip/stop."""
    row: EditRow = ray.get(editor.edit.remote(request, step))
    checks = monitor.observe(row)
    if health_action(checks) in ROLLBACK:
        ray.get(editor.undo_last.remote())
        row = row.model_copy(update={"rolled_back": True})
    else:
        monitor.keep(row)
    return row, checks
