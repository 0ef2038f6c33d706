"""Disk planning: what a campaign will write, estimated from its spec without loading weights.

`seqedit validate` prints the estimate and warns above the spec's `disk_budget_gb`.

* Edit log and checkpoints are computed from shapes. The model is built from its config on
  the meta device (no weights read, no memory used); the method's `Footprint` gives the
  updates one step logs and the sequential state a checkpoint holds, as empty tensors of
  their real shapes and dtypes. A safetensors file is 8 bytes, its JSON header (one entry
  per tensor, padded to 8 bytes) and the tensors' bytes: the edit log of a shard holds every
  step of it (`encode_edit_log`), its checkpoint the fp32 masters of the edited modules,
  the method's state and two counts (`SequentialEditor.checkpoint`).
* Tables are Parquet parts: `TABLE_BYTES` gives, per table, the bytes of one part file
  whatever its rows (footer, schema, column metadata) and of one more row, measured on
  real testbed campaigns (see its docstring). Row and part counts come from the spec:
  the shards, the evaluation plan (`eval_plan.shard_plan`) and the health checks due.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

from seqedit.methods.arch import module_weight
from seqedit.methods.config import names_for, validate_config
from seqedit.methods.method import EditMethod
from seqedit.methods.registry import get_method
from seqedit.methods.updates import Update
from seqedit.pipeline.run.driver import plan_shards
from seqedit.pipeline.run.eval_plan import shard_plan
from seqedit.schemas.campaign import CampaignSpec
from seqedit.workers.edit_log import EDIT_LOG_VERSION, encode_edit_log

GB = 1e9
"""Bytes in a gigabyte (the unit of `disk_budget_gb`; decimal, as disks are sold)."""


@dataclass(frozen=True)
class PartBytes:
    """Size of one Parquet part of a table: `per_part` + `per_row` x rows (bytes)."""

    per_part: int
    per_row: float

    def size(self, parts: int, rows: int) -> int:
        """Bytes of `parts` part files holding `rows` rows in all."""
        return round(parts * self.per_part + rows * self.per_row)


TABLE_BYTES: dict[str, PartBytes] = {
    "edits": PartBytes(per_part=6_500, per_row=80.0),
    "evals": PartBytes(per_part=6_800, per_row=30.0),
    "health": PartBytes(per_part=2_800, per_row=7.5),
    "model_evals": PartBytes(per_part=2_400, per_row=23.0),
}
"""Bytes per part file and per row of each table, as pyarrow's default Parquet writer
(snappy, dictionaries, statistics) writes them. Measured on four tiny-testbed campaigns
(ROME 20 and 40 edits, FT-M 10, AlphaEdit 20; immediate evaluation, periodic health checks
with held-out perplexity): `per_part` is the size of a part holding one of their rows
(edits 6589, evals 6809, health 2799, model_evals 2395 bytes), `per_row` the slope of the
size of parts of 1 to all of their distinct rows (90 edits: 78, 315 evals: 28, 358
health: 7.5, 8 model_evals: 23 bytes a row). Longer campaigns repeat more of each column
(campaign, method, relations, check names), so their rows compress at least as well."""

_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.uint8: "U8", torch.bool: "BOOL",
}  # fmt: skip
_FINGERPRINT = "0" * 64  # a sha256 in hex, as the checkpoint's metadata records it


@dataclass(frozen=True)
class DiskEstimate:
    """Bytes a campaign writes, by kind."""

    edit_log: int
    checkpoints: int
    tables: int

    @property
    def total(self) -> int:
        """Everything together."""
        return self.edit_log + self.checkpoints + self.tables

    def rows(self) -> list[tuple[str, int]]:
        """(what, bytes) in display order, the total last."""
        return [
            ("edit log", self.edit_log),
            ("checkpoints", self.checkpoints),
            ("tables", self.tables),
            ("total", self.total),
        ]


def safetensors_size(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> int:
    """Bytes of the safetensors file of `tensors` (any device, meta included) and `metadata`:
    8 (header length) + the JSON header padded to 8 + the tensors' data."""
    header: dict[str, Any] = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0  # data in safetensors' order: larger dtypes first, then by name
    for name, tensor in sorted(tensors.items(), key=lambda kv: (-kv[1].element_size(), kv[0])):
        size = tensor.numel() * tensor.element_size()
        header[name] = {
            "dtype": _DTYPES[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    length = len(json.dumps(header, separators=(",", ":")).encode())
    return 8 + -(-length // 8) * 8 + offset


def meta_model(config: PretrainedConfig) -> PreTrainedModel:
    """The model of `config` on the meta device: every shape, no weights, no memory."""
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def edit_log_bytes(
    spec: CampaignSpec, method: EditMethod, config: Any, model: PreTrainedModel
) -> int:
    """Bytes of every shard's edit-log file (`write_edit_log`)."""
    assert method.footprint is not None
    metadata = {"campaign": spec.name, "editlog_version": str(EDIT_LOG_VERSION)}
    by_size: dict[int, list[Update]] = {}  # requests in a step -> what such a step logs
    total = 0
    for shard in plan_shards(spec.n_steps, spec.shard_size):
        entries = []
        for step in range(shard.start, shard.stop):
            n = len(spec.step_edits(step))
            if n not in by_size:
                by_size[n] = method.footprint.step(model, config, n)
            entries.append((step, by_size[n]))
        total += safetensors_size(encode_edit_log(entries), metadata)
    return total


def checkpoint_bytes(
    spec: CampaignSpec, method: EditMethod, config: Any, model: PreTrainedModel
) -> int:
    """Bytes of every shard's checkpoint (`save_checkpoint`): fp32 masters of the edited
    modules, the method's state after the shard's edits, the counts."""
    assert method.footprint is not None
    names = names_for(model, config)
    masters = {}
    for module in method.modules_in(model, config, names):
        weight, _ = module_weight(model, module, names.rewrite_weight_transposed)
        masters[f"weight.{module}"] = torch.empty(weight.shape, dtype=torch.float32, device="meta")
    counts = {name: torch.empty(1, dtype=torch.int64, device="meta") for name in ("a", "b")}
    total = 0
    for shard in plan_shards(spec.n_steps, spec.shard_size):
        applied = spec.step_edits(shard.stop - 1).stop
        state = method.footprint.state(model, config, applied)
        tensors = {**masters, **{f"state.{k}": v for k, v in state.items()}}
        tensors |= {"n_applied": counts["a"], "n_steps": counts["b"]}
        metadata = {
            "method": method.name,
            "method_version": method.version,
            "weights_fingerprint": _FINGERPRINT,
            "n_applied": str(applied),
        }
        total += safetensors_size(tensors, metadata)
    return total


def table_counts(spec: CampaignSpec, n_modules: int, memory: bool) -> dict[str, tuple[int, int]]:
    """Table -> (part files, rows) the campaign writes when every shard runs through once."""
    shards = plan_shards(spec.n_steps, spec.shard_size)
    health = spec.health
    per_request = 1 + (health.max_update_norm is not None and not memory)  # verified, norm
    per_step = (health.min_success_rate is not None) + (health.min_target_prob is not None)
    checks = 3 + 2 * (health.heldout is not None) + (1 if memory else n_modules)
    points = spec.n_edits // health.every if health.every else 0
    evals = model_evals = eval_parts = model_parts = 0
    for shard in shards:
        for task in shard_plan(spec, shard.start, shard.stop):
            eval_parts += 1
            if task.protocol == "immediate":
                evals += sum(len(spec.step_edits(s)) for s in range(task.first_step, task.step + 1))
            else:
                applied = spec.step_edits(task.step).stop
                chunk = spec.evaluation.chunk
                evals += min(chunk, applied - task.chunk * chunk)
                if task.chunk == 0 and health.heldout is not None:
                    model_evals, model_parts = model_evals + 1, model_parts + 1
    health_rows = spec.n_edits * per_request + spec.n_steps * per_step + points * checks
    return {
        "edits": (len(shards), spec.n_edits),
        "evals": (eval_parts, evals),
        "health": (len(shards) if health_rows else 0, health_rows),
        "model_evals": (model_parts, model_evals),
    }


def estimate_disk(spec: CampaignSpec, model_config: PretrainedConfig) -> DiskEstimate | None:
    """What `spec` writes on a model of `model_config` (None: its method has no footprint)."""
    method = get_method(spec.method)
    if method.footprint is None:
        return None
    config = validate_config(method.config_cls, spec.hparams, where=f"{spec.name}: hparams")
    model = meta_model(model_config)
    n_modules = len(method.modules_in(model, config, names_for(model, config)))
    counts = table_counts(spec, n_modules, method.memory is not None)
    return DiskEstimate(
        edit_log=edit_log_bytes(spec, method, config, model),
        checkpoints=checkpoint_bytes(spec, method, config, model),
        tables=sum(TABLE_BYTES[t].size(*counts[t]) for t in counts),
    )


def estimate_for_model_dir(spec: CampaignSpec) -> DiskEstimate | None:
    """`estimate_disk` with the config of the spec's model directory (its config.json only)."""
    return estimate_disk(spec, AutoConfig.from_pretrained(spec.model))


def format_estimate(estimate: DiskEstimate) -> str:
    """The estimate as a small aligned table (GB with 3 decimals, and bytes)."""
    lines = [f"{'':12} {'GB':>10} {'bytes':>16}"]
    for what, size in estimate.rows():
        lines.append(f"{what:12} {size / GB:10.3f} {size:16,d}")
    return "\n".join(lines)
