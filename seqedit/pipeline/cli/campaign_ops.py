"""`seqedit validate`, `status`, `rerun` and `rebuild`: a campaign before, during, after.

`validate` checks a spec without running it: the schema, the method and every hparam
(did-you-mean for unknown ones), and, unless `schema_only`, that the model, the dataset
(enough valid records) and the stats it names exist; `plan_disk` estimates what the
campaign will write (`disk_plan`) against its disk budget. `status` reads `state.json`, which
the driver rewrites atomically after every edit, so it can run while the campaign does.
`rerun` runs a campaign directory again from its frozen `spec.yaml`: unfinished shards
resume from the last checkpoint. `rebuild_model` writes the model at any step from the
base model and the edit log.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import yaml
from pydantic import ValidationError

from seqedit.methods.config import validate_config
from seqedit.methods.registry import get_method, registered_methods
from seqedit.pipeline.campaign_dir.lock import driver_running
from seqedit.pipeline.campaign_dir.parts import list_parts
from seqedit.pipeline.campaign_dir.state import CampaignState, ShardState
from seqedit.pipeline.cli.disk_plan import GB, DiskEstimate, estimate_for_model_dir
from seqedit.pipeline.cli.handlers import CliError
from seqedit.pipeline.run.driver import ProgressCallback, run_campaign
from seqedit.pipeline.run.eval_plan import shard_plan
from seqedit.pipeline.run.shard_run import editlog_path
from seqedit.schemas.campaign import CampaignSpec, SpecError, load_spec
from seqedit.schemas.loaders import load_requests
from seqedit.storage import Where, location
from seqedit.workers.corpus import CorpusError, iter_documents
from seqedit.workers.edit_log import read_edit_log
from seqedit.workers.editor import SequentialEditor

SPEC_FILE = "spec.yaml"


def validate_spec(spec_file: Path, *, schema_only: bool = False) -> CampaignSpec:
    """The spec of `spec_file`, or an error naming the file and every problem found."""
    spec = load_spec(spec_file)
    method = get_method(spec.method)
    config = validate_config(method.config_cls, spec.hparams, where=f"{spec_file}: hparams")
    if spec.edits_per_step > 1 and not method.batched:
        batched = ", ".join(sorted(m.name for m in registered_methods().values() if m.batched))
        raise SpecError(
            f"{spec_file}: field 'edits_per_step' is {spec.edits_per_step}, but method "
            f"{method.name!r} edits one request at a time (batched: {batched})"
        )
    if schema_only:
        return spec
    if not Path(spec.model).is_dir():
        raise SpecError(f"{spec_file}: field 'model': no model directory at {spec.model}")
    if method.uses_second_moment(config) and spec.stats is None:
        raise SpecError(f"{spec_file}: field 'stats': method {method.name} needs covariance stats")
    if spec.stats is not None and not location(spec.stats).is_dir() and spec.stats_build is None:
        raise SpecError(f"{spec_file}: field 'stats': no stats directory at {spec.stats} "
                        "(add `stats_build:` to build them there)")  # fmt: skip
    if spec.stats_build is not None:
        try:  # the corpus must be readable (it is read in full when the stats are built)
            for source in spec.stats_build.corpus:
                next(iter_documents([source], text_column=spec.stats_build.text_column), None)
        except CorpusError as exc:
            raise SpecError(f"{spec_file}: field 'stats_build.corpus': {exc}") from exc
    # strict unless the spec quarantines: a bad record then fails here, named
    loaded = load_requests(
        spec.dataset.path, spec.dataset.format, quarantine=spec.dataset.quarantine
    )
    usable = len(loaded.requests) - spec.dataset.offset
    if usable < spec.n_edits:
        raise SpecError(
            f"{spec_file}: field 'n_edits' is {spec.n_edits}, but {spec.dataset.path} has "
            f"{usable} valid records after offset {spec.dataset.offset}"
        )
    return spec


def plan_disk(
    spec: CampaignSpec, *, budget_gb: float | None = None
) -> tuple[DiskEstimate | None, str | None]:
    """(what the campaign will write, a message or None): with an estimate, the message is
    a warning that it exceeds `budget_gb` (default: the spec's `disk_budget_gb`); without
    one, why there is none. The estimate needs the model's config.json (not its weights)
    and a method with a `footprint` (`disk_plan.estimate_disk`)."""
    if not (Path(spec.model) / "config.json").is_file():
        return None, f"no disk estimate: no config.json in {spec.model}"
    try:
        estimate = estimate_for_model_dir(spec)
    except (OSError, ValueError, LookupError) as exc:  # a config transformers cannot build
        return None, f"no disk estimate: {exc}"
    if estimate is None:
        return None, f"no disk estimate: method {spec.method!r} declares no footprint"
    budget = spec.disk_budget_gb if budget_gb is None else budget_gb
    if estimate.total <= budget * GB:
        return estimate, None
    return estimate, (
        f"campaign {spec.name!r} would write about {estimate.total / GB:.1f} GB, over the "
        f"disk budget of {budget:g} GB (raise `disk_budget_gb` or pass --disk-budget, or "
        "make fewer shards: fewer checkpoints)"
    )


def frozen_spec(campaign_dir: Where) -> CampaignSpec:
    """The spec a campaign directory was created with (`spec.yaml`, hash checked)."""
    path = location(campaign_dir) / SPEC_FILE
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no frozen spec here (is this a campaign dir?)") from None
    except yaml.YAMLError as exc:
        raise SpecError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise SpecError(f"{path}: a campaign spec is a mapping, got {type(raw).__name__}")
    recorded = raw.pop("spec_hash", None)
    try:
        spec = CampaignSpec.model_validate(raw)
    except ValidationError as exc:
        raise SpecError(f"{path}: invalid frozen spec: {exc}") from exc
    if recorded != spec.spec_hash():
        raise SpecError(f"{path}: field spec_hash does not match the spec (file edited?)")
    return spec


def status_table(campaign_dir: Where) -> tuple[CampaignState, pa.Table, bool]:
    """The campaign state, one row per shard (range, status, attempt, progress, error) and
    whether a live driver is running it now (a "running" campaign without one was
    interrupted: its driver was killed)."""
    state = CampaignState.load(campaign_dir)
    spec = frozen_spec(campaign_dir)
    rows = [
        {
            "shard": s.index,
            "steps": f"{s.start}-{s.stop - 1}",
            "status": s.status,
            "attempt": s.attempt,
            "done": f"{s.steps_done}/{s.stop - s.start}",
            "evals": _evals_written(campaign_dir, spec, s),
            "finished_at": s.finished_at or "",
            "error": (s.error or "")[:60],
        }
        for s in state.shards
    ]
    return state, pa.Table.from_pylist(rows), driver_running(campaign_dir)


def _evals_written(campaign_dir: Where, spec: CampaignSpec, shard: ShardState) -> str:
    """"written/planned" evaluation tasks of a done shard (a rerun writes what is missing:
    its driver died before the evaluators answered); of another shard, those written."""
    parts = list_parts(campaign_dir, "evals", shard.index, shard.attempt)
    written = {p.name for p in parts}
    if shard.status != "done":
        return str(len(written)) if written else ""
    planned = {f"part-{p.part:05d}.parquet" for p in shard_plan(spec, shard.start, shard.stop)}
    return f"{len(planned & written)}/{len(planned)}"


def rerun_selection(campaign_dir: Where, *, failed: bool, shard: int | None) -> list[int] | None:
    """The shards `seqedit rerun` runs: None (every shard not done), the failed ones (and
    one left "running" by a killed driver), or `[shard]`. No failed shard, a shard that
    does not exist or whose predecessor is not done is a `CliError`."""
    if shard is None and not failed:
        return None
    state = CampaignState.load(campaign_dir)
    if shard is not None:
        if not 0 <= shard < len(state.shards):
            raise CliError(f"no shard {shard}: the campaign has shards 0..{len(state.shards) - 1}")
        before = state.shards[shard - 1] if shard > 0 else None
        if before is not None and before.status != "done":
            raise CliError(
                f"{campaign_dir}: shard {shard} starts from the checkpoint of shard "
                f"{shard - 1}, which is {before.status}; rerun shard {shard - 1} first "
                "(or `seqedit rerun` to continue)"
            )
        return [shard]
    chosen = [s.index for s in state.shards if s.status in ("failed", "running")]
    if not chosen:
        statuses = ", ".join(f"{s.index}: {s.status}" for s in state.shards)
        raise CliError(f"{campaign_dir}: no failed shard to rerun (shards {statuses})")
    return chosen


def rerun_campaign(
    campaign_dir: Where,
    *,
    progress: ProgressCallback | None = None,
    shards: list[int] | None = None,
) -> CampaignState:
    """Run shards of `campaign_dir` again from its frozen spec (see `run_campaign`)."""
    return run_campaign(frozen_spec(campaign_dir), campaign_dir, progress=progress, shards=shards)


def logs_through(
    campaign_dir: Where, state: CampaignState, through_step: int
) -> Iterator[tuple[ShardState, Where]]:
    """Each shard holding steps up to `through_step`, with its edit-log file; a shard not
    done (nor stopped) there is a `CliError`."""
    for shard in state.shards:
        if shard.start > through_step:
            break
        if shard.status not in ("done", "stopped"):
            raise CliError(
                f"{campaign_dir}: step {through_step} needs the edit log of shard "
                f"{shard.index}, which is {shard.status}"
            )
        yield shard, editlog_path(location(campaign_dir), shard.index)


def rebuild_model(campaign_dir: Where, through_step: int, out: Path) -> str:
    """Write the campaign's model as it was right after step `through_step` to `out` (a
    Hugging Face model directory): the base model plus the edit log of every step up to
    it, replayed through the editor's own apply path (bit for bit on CPU). Where that step
    ends a shard, the result is checked against the shard's weights fingerprint. Returns
    the fingerprint of the edited weights."""
    spec = frozen_spec(campaign_dir)
    state = CampaignState.load(campaign_dir)
    if not 0 <= through_step < spec.n_steps:
        raise CliError(f"--step {through_step}: the campaign has steps 0..{spec.n_steps - 1}")
    editor = SequentialEditor(
        spec.model, spec.method, spec.hparams, stats_dir=spec.stats, campaign=spec.name,
        seed=spec.seed,
    )  # fmt: skip
    for shard, log_file in logs_through(campaign_dir, state, through_step):
        editor.replay(read_edit_log(log_file), until_step=through_step + 1)
        ends_shard = through_step == shard.stop - 1 and shard.status == "done"
        if ends_shard and editor.weights_fingerprint() != shard.weights_fingerprint:
            raise CliError(
                f"{log_file}: replaying the edit log does not reproduce the weights "
                f"fingerprint state.json records for shard {shard.index}"
            )
    if editor.n_steps <= through_step:
        raise CliError(
            f"{campaign_dir}: the edit log ends after step {editor.n_steps - 1} (the campaign "
            f"stopped there); there is no step {through_step}"
        )
    editor.save_model(out)
    return editor.weights_fingerprint()
