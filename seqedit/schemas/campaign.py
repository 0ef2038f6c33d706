"""The campaign spec: what to edit, with which method, and how to run and evaluate it."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from seqedit.errors import SeqeditError
from seqedit.schemas.tables import HealthAction
from seqedit.schemas.yaml_file import read_yaml_mapping


class DatasetSpec(BaseModel):
    """Where the edit requests come from and which of them to use."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    path: str = Field(description="Requests file (CounterFact, zsRE, or our JSONL).")
    format: str = Field(default="auto", description="Loader format name, or 'auto'.")
    offset: int = Field(default=0, ge=0, description="Skip this many valid records first.")
    quarantine: bool = Field(
        default=False, description="Set aside bad records (rejects.jsonl) instead of failing."
    )
    order: Literal["file", "shuffled"] = Field(
        default="file",
        description="Edit in file order, or in a permutation of the valid records fixed by "
        "`shuffle_seed` (applied before `offset`).",
    )
    shuffle_seed: int = Field(default=0, description="Seed of the `shuffled` order.")


class ResourcesSpec(BaseModel):
    """Ray resources of an actor (the editor, each evaluator, each stats actor)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    num_cpus: float = Field(default=1, gt=0)
    num_gpus: float = Field(default=0, ge=0)
    memory: int | None = Field(
        default=None, gt=0, description="Bytes of memory Ray reserves for the actor."
    )
    torch_threads: int | None = Field(default=None, ge=1, description="None: Ray's default.")


class EvaluationSpec(BaseModel):
    """The evaluator pool: actors that score edits beside the editor (pipelined)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    actors: int = Field(default=1, ge=1, description="Evaluator actors in the pool.")
    chunk: int = Field(default=256, ge=1, description="Records per evaluation task.")
    immediate: bool = Field(
        default=False,
        description="Also score every record right after its own step (protocol "
        "`immediate`: paraphrases and neighbours too, not just the rewrite prompt).",
    )
    fluency_records: int = Field(
        default=0,
        ge=0,
        description="Records per evaluation point (evenly spaced, among those with "
        "generation prompts) whose generations are scored for fluency.",
    )
    resources: ResourcesSpec = Field(
        default_factory=ResourcesSpec, description="Ray resources of each evaluator actor."
    )


class StatsBuildSpec(BaseModel):
    """How to build the campaign's covariance stats when `stats` does not hold them yet
    (sharded on Ray actors, resumable; `seqedit stats build` with the same fields)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    corpus: list[str] = Field(min_length=1, description="Text, JSONL, Parquet or HF dataset.")
    text_column: str = "text"
    n_samples: int | None = Field(default=None, gt=0, description="None: every document.")
    seed: int = 0
    batch_size: int = Field(default=32, gt=0)
    max_length: int | None = Field(default=None, gt=0, description="None: model context.")
    dtype: Literal["float32", "float64"] = "float64"
    shards: int = Field(default=4, ge=1)
    actors: int = Field(default=1, ge=1)
    resources: ResourcesSpec = Field(
        default_factory=ResourcesSpec, description="Ray resources of each stats actor."
    )
    until_stable: float | None = Field(
        default=None,
        gt=0,
        lt=1,
        description="Stop once C^-1 k (and, for AlphaEdit, P k) of the campaign's requests "
        "change by less than this (relative) from one shard to the next (`seqedit stats "
        "build --until-stable`); needs shards > 1.",
    )
    probes: int = Field(default=64, ge=1, description="Requests whose keys until_stable watches.")

    @model_validator(mode="after")
    def _chunks(self) -> StatsBuildSpec:
        if self.until_stable is not None and self.shards < 2:
            raise ValueError("until_stable needs shards > 1: the shards are its chunks")
        return self


class HealthSpec(BaseModel):
    """Health checks after every edit and what a failure does (`record`, `skip`: roll the
    edit back, `stop`: stop the campaign at the last healthy state)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    window: int = Field(default=50, ge=1, description="Edits in the rolling trend window.")
    min_success_rate: float | None = Field(
        default=0.5, ge=0, le=1, description="Trend: share of verified edits in the window."
    )
    min_target_prob: float | None = Field(
        default=1e-3,
        ge=0,
        description="Trend: median P(new) right after the edit over the window (a value "
        "stuck near 1e-5 is the ROME collapse).",
    )
    max_update_norm: float | None = Field(
        default=None, gt=0, description="Per edit: Frobenius norm of the update."
    )
    on_unverified: HealthAction = Field(
        default="record", description="An edit that leaves P(new) <= P(true)."
    )
    on_update_norm: HealthAction = Field(default="skip", description="An update above the norm.")
    on_trend: HealthAction = Field(default="stop", description="A trend below its threshold.")
    every: int = Field(
        default=100,
        ge=0,
        description="Periodic checks every this many edits (0: off): retention of a sample "
        "of earlier edits, locality drift against the base model, per-layer weight drift.",
    )
    n_probes: int = Field(
        default=32, ge=1, description="Probe prompts for locality: the first neighbourhood "
        "prompts of the campaign's requests (their rewrite prompts if there are none)."
    )  # fmt: skip
    n_retention: int = Field(default=32, ge=1, description="Earlier edits re-checked.")
    min_retention: float | None = Field(
        default=None, ge=0, le=1, description="Share of the sampled earlier edits still held."
    )
    max_locality_kl: float | None = Field(
        default=None, ge=0, description="Mean KL(base || edited) on the probes, nats."
    )
    min_locality_top1: float | None = Field(
        default=None, ge=0, le=1, description="Share of probes whose top-1 token is unchanged."
    )
    max_weight_drift: float | None = Field(
        default=None, gt=0, description="||W_t - W_0|| / ||W_0|| of any edited layer."
    )
    on_periodic: HealthAction = Field(
        default="record",
        description="A periodic check over its limit ('retry' and 'skip' act as 'record': "
        "there is no single edit to redo or undo).",
    )
    heldout: str | None = Field(
        default=None,
        description="Held-out text (.txt, one document per line, or JSONL with a 'text' "
        "field) whose perplexity the periodic checks track; None: no perplexity check.",
    )
    n_heldout: int = Field(default=64, ge=1, description="Documents of `heldout` used.")
    max_perplexity_ratio: float | None = Field(
        default=None, gt=0, description="Held-out perplexity over the base model's."
    )
    max_retries: int = Field(
        default=2, ge=1, description="Policy 'retry': redo a failing edit at most this often."
    )
    retry_steps_factor: float = Field(
        default=2.0,
        ge=1,
        description="Policy 'retry': each retry multiplies the method's optimisation step "
        "budget by this factor (and draws from another seed).",
    )


class CampaignSpec(BaseModel):
    """A sequential editing campaign. Relative paths (`model`, `stats`, `dataset.path`,
    `health.heldout`, `stats_build.corpus`, and a trained editor's `hparams.checkpoint`)
    are resolved against the spec's folder."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    model: str = Field(description="Local Hugging Face model directory.")
    dataset: DatasetSpec
    method: str = Field(default="rome", description="Registered editing method.")
    hparams: dict[str, Any] = Field(default_factory=dict, description="Method config fields.")
    stats: str | None = Field(default=None, description="Covariance stats dir (seqedit stats).")
    stats_build: StatsBuildSpec | None = Field(
        default=None,
        description="Build the stats into `stats` when they are not there (a mismatching "
        "stats dir is refused, never rebuilt over).",
    )
    n_edits: int = Field(gt=0, description="Number of edits (requests), applied in order.")
    edits_per_step: int = Field(
        default=1,
        ge=1,
        description="Requests applied together as one batched edit step (methods with a "
        "batched solve, `edit_batch`: see docs/methods.md); the last step may hold fewer.",
    )
    shard_size: int | None = Field(default=None, gt=0, description="Steps per shard.")
    eval_every: int | None = Field(
        default=None, gt=0, description="Retention evaluation of all edits so far every K edits."
    )
    eval_batch_size: int = Field(default=64, gt=0)
    evaluation: EvaluationSpec = Field(default_factory=EvaluationSpec)
    seed: int = 0
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec)
    health: HealthSpec = Field(default_factory=HealthSpec)
    max_attempts: int = Field(
        default=3,
        ge=1,
        description="Attempts per shard when its editor process dies; each retry starts a "
        "new editor from the last checkpoint. Other errors stop the campaign at once.",
    )
    disk_budget_gb: float = Field(
        default=50.0,
        gt=0,
        description="`seqedit validate` warns when its estimate of what the campaign writes "
        "(edit log, checkpoints, tables) exceeds this many GB (1e9 bytes).",
    )

    @property
    def n_steps(self) -> int:
        """Edit steps: `n_edits` requests, `edits_per_step` at a time."""
        return -(-self.n_edits // self.edits_per_step)

    def step_edits(self, step: int) -> range:
        """Positions (0-based, in campaign order) of the requests edited at `step`."""
        start = step * self.edits_per_step
        return range(start, min(start + self.edits_per_step, self.n_edits))

    @model_validator(mode="after")
    def _stats_build_has_a_place(self) -> CampaignSpec:
        if self.stats_build is not None and self.stats is None:
            raise ValueError("stats_build needs `stats:`, the directory to build the stats in")
        return self

    @model_validator(mode="after")
    def _shard_fits(self) -> CampaignSpec:
        if self.shard_size is not None and self.shard_size > self.n_steps:
            raise ValueError(
                f"shard_size {self.shard_size} exceeds the campaign's {self.n_steps} steps"
            )
        return self

    def spec_hash(self) -> str:
        """sha256 of the canonical JSON of the spec: identifies what a campaign dir holds.
        Fields left at their defaults are not hashed, so a field added to the schema later
        (with a default that keeps the old behaviour) does not orphan existing campaigns."""
        canonical = json.dumps(self.model_dump(mode="json", exclude_defaults=True), sort_keys=True)
        return hashlib.sha256(canonical.encode()).hexdigest()

    def resolved(self, base: str | Path) -> CampaignSpec:
        """A copy whose relative paths are made absolute against `base`."""
        root = Path(base)

        def fix(path: str | None) -> str | None:
            if path is None or "://" in path:
                return path
            return str((root / path).resolve())

        dataset = self.dataset.model_copy(update={"path": fix(self.dataset.path)})
        health = self.health.model_copy(update={"heldout": fix(self.health.heldout)})
        build = self.stats_build
        if build is not None:
            build = build.model_copy(update={"corpus": [fix(c) or c for c in build.corpus]})
        hparams = dict(self.hparams)
        if isinstance(hparams.get("checkpoint"), str):  # a trained editor's directory
            hparams["checkpoint"] = fix(hparams["checkpoint"])
        return self.model_copy(
            update={
                "hparams": hparams,
                "model": fix(self.model),
                "stats": fix(self.stats),
                "dataset": dataset,
                "health": health,
                "stats_build": build,
            }
        )


class SpecError(SeqeditError, ValueError):
    """A campaign spec file that cannot be used, with the file and the fields at fault."""


def load_spec(path: str | Path) -> CampaignSpec:
    """Read and validate a campaign YAML; errors name the file and each bad field."""
    file = Path(path)
    raw = read_yaml_mapping(file, "campaign spec", SpecError)
    try:
        spec = CampaignSpec.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(
            f"field '{'.'.join(str(p) for p in err['loc'])}': {err['msg']}" for err in exc.errors()
        )
        raise SpecError(f"{file}: invalid campaign spec: {problems}") from exc
    return spec.resolved(file.parent)
