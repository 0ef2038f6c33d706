"""`seqedit hparams import FILE --training`: EasyEdit's MEND/SERAC yaml as our training
config (the `--config` of `seqedit train mend|serac`).

EasyEdit's trainer counts iterations of `batch_size` requests and takes an optimiser step
every `accumulate_bs` of them; ours counts optimiser steps of one global batch. So:

    batch_size   = batch_size * accumulate_bs        (requests per optimiser step)
    max_steps    = max_iters // accumulate_bs
    val_every    = max(1, val_interval // accumulate_bs)
    val_size     = val_steps * val_batch_size
    early_stopping.patience = max(1, early_stop_patience // val_interval)   (validations)
    early_stopping.metric   = loss/total  (EasyEdit's `loss/total_edit_val`: the val total)

The method's own fields map by its record (`HparamsImport.training_renamed`: source field
-> dotted field of our training config); every other field of the file is reported as
dropped with the reason the edit-hparams import gives.
"""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from seqedit.methods.config import HparamsError
from seqedit.methods.method import parameter_module
from seqedit.methods.registry import get_method
from seqedit.pipeline.cli.hparams_import import import_hparams

STOP_KEYS = {"loss/total_edit_val": "loss/total", "loss/total_val": "loss/total"}
"""EasyEdit's early-stop keys -> our validation metric."""


class ImportedTraining(BaseModel):
    """One imported file as a training config, and what became of each source field."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    method: str
    config: dict[str, Any] = Field(description="Our training config (validated).")
    mapped: dict[str, str] = Field(default_factory=dict, description="Source field -> ours.")
    dropped: list[str] = Field(default_factory=list, description="Source fields not used.")


def _set(config: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    for name in parents:
        config = config.setdefault(name, {})
    config[leaf] = value


def _trainer_fields(source: dict[str, Any], config: dict[str, Any], mapped: dict[str, str]) -> None:
    """The trainer's counts, rescaled from EasyEdit's iterations (module doc)."""
    accumulate = int(source.get("accumulate_bs", 1) or 1)
    if "batch_size" in source:
        _set(config, "batch_size", int(source["batch_size"]) * accumulate)
        mapped["batch_size"] = "batch_size (x accumulate_bs)"
    if "max_iters" in source:
        _set(config, "max_steps", max(1, int(source["max_iters"]) // accumulate))
        mapped["max_iters"] = "max_steps (/ accumulate_bs)"
    if "val_interval" in source:
        _set(config, "val_every", max(1, int(source["val_interval"]) // accumulate))
        mapped["val_interval"] = "val_every (/ accumulate_bs)"
    if "val_steps" in source:
        per = int(source.get("val_batch_size", 1) or 1)
        _set(config, "val_size", int(source["val_steps"]) * per)
        mapped["val_steps"] = "val_size (x val_batch_size)"
    if "early_stop_patience" in source:
        every = int(source.get("val_interval", 1) or 1)
        patience = max(1, int(source["early_stop_patience"]) // every)
        _set(config, "early_stopping.patience", patience)
        mapped["early_stop_patience"] = "early_stopping.patience (/ val_interval)"
    key = source.get("early_stop_key")
    if key is not None:
        if key not in STOP_KEYS:
            raise HparamsError(f"field 'early_stop_key': {key!r} has no counterpart here")
        _set(config, "early_stopping.metric", STOP_KEYS[key])
        mapped["early_stop_key"] = "early_stopping.metric"
    if "seed" in source:
        _set(config, "seed", int(source["seed"]))
        mapped["seed"] = "seed"


def import_training(path: Path, method: str | None = None) -> ImportedTraining:
    """Read an EasyEdit MEND/SERAC yaml as `seqedit train`'s config. Raises HparamsError
    (naming the file and field) for a method without trained parts or a value our
    training config refuses."""
    from seqedit.pipeline.run.train_job import TRAINING_CONFIGS, EarlyStopping

    path = Path(path)
    edit = import_hparams(path, method)  # detects the method, checks every field is known
    how = get_method(edit.method).hparams_import
    if edit.method not in TRAINING_CONFIGS or how is None:
        raise HparamsError(f"{path}: {edit.method} has no training to import (MEND, SERAC do)")
    source = yaml.safe_load(path.read_text(encoding="utf-8"))
    source = {k: float(v) if k in {"lr", "lr_lr", "edit_lr"} and isinstance(v, str) else v
              for k, v in source.items()}  # fmt: skip
    config: dict[str, Any] = {}
    mapped: dict[str, str] = {}
    _trainer_fields(source, config, mapped)
    for field, ours in how.training_renamed.items():
        if field not in source:
            continue
        value = source[field]
        if field == "inner_params":
            value = list(dict.fromkeys(parameter_module(v) for v in value))
        for target in ours.split(","):
            _set(config, target.strip(), value)
        mapped[field] = ours
    stopping = config.pop("early_stopping", {})
    try:
        TRAINING_CONFIGS[edit.method].model_validate(config)
        EarlyStopping.model_validate(stopping)
    except ValidationError as exc:
        raise HparamsError(f"{path} imported as {edit.method} training: {exc}") from None
    if stopping:
        config["early_stopping"] = stopping
    dropped = [field for field in source if field not in mapped]
    return ImportedTraining(method=edit.method, config=config, mapped=mapped, dropped=dropped)


def render_training_yaml(imported: ImportedTraining, source: Path) -> str:
    """Our training YAML, with a comment block saying what was mapped and dropped."""
    lines = [
        f"# Imported by `seqedit hparams import --training` from {source} (EasyEdit).",
        f"# Use: seqedit train {imported.method} --config THIS_FILE --model ... --train ... "
        "--val ... --out ...",
        "# Mapped:",
        *(f"#   {k} -> {v}" for k, v in imported.mapped.items()),
        "# Not training fields of seqedit (see `seqedit hparams import` for why each is dropped):",
        *(f"#   {line}" for line in textwrap.wrap(", ".join(imported.dropped), 94)),
    ]
    body = yaml.safe_dump(imported.config, sort_keys=False, default_flow_style=False)
    return "\n".join(lines) + "\n" + body
