"""Training a trained editor (MEND, SERAC) as a Ray Train job: `seqedit train mend|serac`.

A `TorchTrainer` runs the method's trainer (`MendTrainer`, `SeracTrainer`: plain classes,
`trainer_common.EditorTrainer`) on N data-parallel workers; torch.
distributed carries the sums and gathers (gloo on CPU). Every `val_every` steps, and at the
last step, the workers validate; rank 0 then writes, in this order:
- `train/rows-<step>.parquet`: the train rows since the last validation and the val row;
- `best/editor.pt` and `best/provenance.json` when the watched metric improved;
- a Ray Train checkpoint (`state.pt`: trainer, early-stopping and row state).
A killed worker restarts the worker group from the last checkpoint (`FailureConfig`);
a killed driver resumes when the same command runs again (same `--out`). Parts written
after the last checkpoint are removed on resume, so the table holds each step once.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Any, Literal

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from seqedit.files import file_sha256, write_text_atomic
from seqedit.schemas.loaders import load_requests
from seqedit.schemas.tables import TrainRow, arrow_schema
from seqedit.workers.mend_trainer import MendTrainer, MendTrainingConfig
from seqedit.workers.model_io import load_model, model_fingerprint
from seqedit.workers.serac_trainer import SeracTrainer, SeracTrainingConfig
from seqedit.workers.trainer_common import Collectives, EditorTrainer

TRAIN_SCHEMA = arrow_schema(TrainRow)
"""The `train` table: one row per (step, split, metric); split is "train" or "val"."""


class EarlyStopping(BaseModel):
    """Stop when `metric` on the validation set has not improved for `patience` checks."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    metric: str = Field(default="loss/total", description="A validation metric name.")
    mode: Literal["min", "max"] = "min"
    patience: int = Field(default=5, ge=1, description="Validations without improvement.")
    min_delta: float = Field(default=0.0, ge=0, description="Smallest change that counts.")


class TrainJob(BaseModel):
    """Everything one training run needs (written to OUT/job.json)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    method: Literal["mend", "serac"] = "mend"
    model: str
    train: str
    val: str
    out: str
    workers: int = Field(default=1, ge=1)
    cpus_per_worker: float = Field(default=1, gt=0)
    gpus_per_worker: float = Field(default=0, ge=0)
    max_failures: int = Field(default=3, ge=0, description="Worker-group restarts allowed.")
    config: MendTrainingConfig | SeracTrainingConfig = Field(default_factory=MendTrainingConfig)
    early_stopping: EarlyStopping = Field(default_factory=EarlyStopping)

    @model_validator(mode="before")
    @classmethod
    def _config_of_the_method(cls, data: Any) -> Any:
        """`config` is validated as the training config of `method` (fields of one method
        are refused by the other's)."""
        if isinstance(data, dict):
            wanted = TRAINING_CONFIGS[data.get("method", "mend")]
            config = data.get("config")
            config = config.model_dump() if isinstance(config, BaseModel) else (config or {})
            data = {**data, "config": wanted.model_validate(config)}
        return data


TRAINING_CONFIGS: dict[str, type[BaseModel]] = {
    "mend": MendTrainingConfig,
    "serac": SeracTrainingConfig,
}
"""Method -> its training config."""


class StopState(BaseModel):
    """The early stopper's memory (checkpointed with the trainer)."""

    best: float | None = None
    best_step: int | None = None
    bad_checks: int = 0
    stopped: bool = False

    def observe(self, value: float, step: int, rule: EarlyStopping) -> bool:
        """Record a validation value; True when it is the best so far."""
        better = (
            self.best is None
            or (rule.mode == "min" and value < self.best - rule.min_delta)
            or (rule.mode == "max" and value > self.best + rule.min_delta)
        )
        if better:
            self.best, self.best_step, self.bad_checks = value, step, 0
        else:
            self.bad_checks += 1
            self.stopped = self.bad_checks >= rule.patience
        return better


def provenance(job: TrainJob) -> dict[str, Any]:
    """What a checkpoint was trained from: model and data fingerprints, config, version."""
    from seqedit import __version__

    return {
        "method": job.method,
        "model": job.model,
        "model_fingerprint": model_fingerprint(job.model),
        "train": job.train,
        "train_sha256": file_sha256(job.train),
        "val": job.val,
        "val_sha256": file_sha256(job.val),
        "config": job.config.model_dump(mode="json"),
        **_counterfactual_provenance(job),
        "early_stopping": job.early_stopping.model_dump(mode="json"),
        "seqedit_version": __version__,
    }


def _counterfactual_provenance(job: TrainJob) -> dict[str, Any]:
    """SERAC started from another counterfactual model: which (its fingerprint)."""
    path = getattr(job.config, "counterfactual", None)
    if path is None:
        return {}
    return {"counterfactual": path, "counterfactual_fingerprint": model_fingerprint(path)}


def make_trainer(
    job: TrainJob, model: Any, tokenizer: Any, train: list, comm: Collectives
) -> EditorTrainer:
    """The plain trainer of `job.method` for one worker."""
    if isinstance(job.config, SeracTrainingConfig):
        counterfactual = None
        if job.config.counterfactual is not None:
            counterfactual, _ = load_model(job.config.counterfactual)
        return SeracTrainer(model, tokenizer, job.config, train, comm, counterfactual)
    return MendTrainer(model, tokenizer, job.config, train, comm)


class TorchCollectives:
    """`Collectives` over torch.distributed (the process group TorchTrainer made)."""

    def __init__(self) -> None:
        import torch.distributed as dist

        self._dist = dist
        self.rank, self.world = dist.get_rank(), dist.get_world_size()

    def sum_(self, tensor: torch.Tensor) -> None:
        if self.world > 1:
            self._dist.all_reduce(tensor)

    def gather(self, value: Any) -> list[Any]:
        if self.world == 1:
            return [value]
        values: list[Any] = [None] * self.world
        self._dist.all_gather_object(values, value)
        return values


def _rows(
    step: int, split: str, metrics: dict[str, float], seconds: float, workers: int
) -> list[dict]:
    return [
        {"step": step, "split": split, "name": name, "value": float(value), "seconds": seconds,
         "workers": workers}
        for name, value in sorted(metrics.items())
    ]  # fmt: skip


def drop_parts_after(out: Path, step: int) -> None:
    """Remove train-table parts of steps after `step` (written after the last checkpoint)."""
    for part in (out / "train").glob("rows-*.parquet"):
        if int(part.stem.split("-")[1]) > step:
            part.unlink()


def train_loop(job_json: str) -> None:
    """The per-worker loop of the TorchTrainer (Ray calls it on every worker)."""
    import ray.train

    job = TrainJob.model_validate_json(job_json)
    out, config = Path(job.out), job.config
    comm = TorchCollectives()
    model, tokenizer = load_model(job.model)
    train = load_requests(job.train).requests
    val = load_requests(job.val).requests[: config.val_size]
    trainer = make_trainer(job, model, tokenizer, train, comm)
    stop = StopState()
    elapsed = 0.0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            saved = torch.load(Path(folder) / "state.pt", weights_only=False)
        trainer.load_state_dict(saved["trainer"])
        stop = StopState.model_validate(saved["stop"])
        elapsed = float(saved["seconds"])
    if comm.rank == 0:
        drop_parts_after(out, trainer.step)
    pending: list[dict] = []
    started = time.perf_counter() - elapsed
    while trainer.step < config.max_steps and not stop.stopped:
        step_started = time.perf_counter()
        metrics = trainer.train_step()
        metrics["time/step"] = time.perf_counter() - step_started
        metrics["time/edit"] = metrics["time/step"] / config.batch_size
        seconds = time.perf_counter() - started
        pending += _rows(trainer.step, "train", metrics, seconds, comm.world)
        if trainer.step % config.val_every and trainer.step < config.max_steps:
            continue
        val_metrics = trainer.validate(val)
        pending += _rows(trainer.step, "val", val_metrics, seconds, comm.world)
        improved = stop.observe(
            val_metrics[job.early_stopping.metric], trainer.step, job.early_stopping
        )
        report = {f"val/{k}": v for k, v in val_metrics.items()} | {"step": trainer.step}
        if comm.rank != 0:
            ray.train.report(report)
            pending = []
            continue
        table = pa.Table.from_pylist(pending, schema=TRAIN_SCHEMA)
        (out / "train").mkdir(parents=True, exist_ok=True)
        pq.write_table(table, out / "train" / f"rows-{trainer.step:09d}.parquet")
        pending = []
        if improved:
            write_best(out, job, trainer, stop)
        with tempfile.TemporaryDirectory() as folder:
            state = {"trainer": trainer.state_dict(), "stop": stop.model_dump(), "seconds": seconds}
            torch.save(state, Path(folder) / "state.pt")
            ray.train.report(report, checkpoint=ray.train.Checkpoint.from_directory(folder))


def write_best(out: Path, job: TrainJob, trainer: EditorTrainer, stop: StopState) -> None:
    """The best parts so far (`trainer.parts()`) as OUT/best/editor.pt, with their
    provenance, replacing the previous best."""
    best = out / "best"
    best.mkdir(parents=True, exist_ok=True)
    torch.save(trainer.parts(), best / "editor.pt.tmp")
    (best / "editor.pt.tmp").replace(best / "editor.pt")
    meta = {**provenance(job), "step": trainer.step, "metric": job.early_stopping.metric,
            "value": stop.best}  # fmt: skip
    write_text_atomic(best / "provenance.json", json.dumps(meta, indent=1))


def run_train_job(job: TrainJob) -> dict[str, Any]:
    """Run (or resume) the job on Ray Train; returns the summary written to OUT/summary.json."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from seqedit.pipeline.run.ray_init import ensure_ray

    out = Path(job.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    job = job.model_copy(  # workers run elsewhere: absolute paths
        update={name: str(Path(getattr(job, name)).resolve()) for name in ("model", "train", "val")}
        | {"out": str(out)}
    )
    if isinstance(job.config, SeracTrainingConfig) and job.config.counterfactual is not None:
        resolved = str(Path(job.config.counterfactual).resolve())
        job = job.model_copy(
            update={"config": job.config.model_copy(update={"counterfactual": resolved})}
        )
    saved = out / "job.json"
    if saved.is_file():
        before = TrainJob.model_validate_json(saved.read_text())
        if before.model_dump(exclude={"workers"}) != job.model_dump(exclude={"workers"}):
            raise ValueError(f"{out} holds another training job ({saved}); use a new --out")
    write_text_atomic(saved, job.model_dump_json(indent=1))
    ensure_ray()
    trainer = TorchTrainer(
        train_loop,
        train_loop_config=job.model_dump_json(),
        scaling_config=ScalingConfig(
            num_workers=job.workers,
            use_gpu=job.gpus_per_worker > 0,
            resources_per_worker={"CPU": job.cpus_per_worker, "GPU": job.gpus_per_worker},
        ),
        run_config=RunConfig(
            name="ray",
            storage_path=str(out),
            failure_config=FailureConfig(max_failures=job.max_failures),
        ),
    )
    started = time.perf_counter()
    result = trainer.fit()
    if result.error is not None:
        raise result.error
    best = out / "best" / "provenance.json"
    summary = {
        "out": str(out),
        "workers": job.workers,
        "seconds_this_run": round(time.perf_counter() - started, 1),
        "best": json.loads(best.read_text()) if best.is_file() else None,
    }
    write_text_atomic(out / "summary.json", json.dumps(summary, indent=1))
    return summary
