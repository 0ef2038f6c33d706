"""`seqedit export --format peft`: a campaign's edits up to a step as one PEFT LoRA adapter.

PEFT's LoRA adds (lora_alpha / r) B A to a module's weight (d_out, d_in), with A (r, d_in)
and B (d_out, r). A campaign's low-rank edits are, per module, dW = sum_t L_t R_t^T; the
exporter stacks them: B = [L_1 ... L_T] (d_out, k), A = [R_1 ... R_T]^T (k, d_in), with
lora_alpha = r so that the scale is 1. That is exact. Where k exceeds the rank the adapter
may have (`--rank`, default the module's full rank min(d_out, d_in)), dW is replaced by its
truncated SVD at that rank, U_r S_r V_r^T (B = U_r S_r, A = V_r^T), and the relative error
||dW - dW_r||_F / ||dW||_F is reported per module. Modules of smaller rank are padded with
zero columns to the adapter's one r (PEFT's plain format: one rank for all modules).

A continued LoRA adapter (`lora`/`dpo` in `continue` mode) logs, per step, the change
s (B' A' - B A); summed, that telescopes to s B_T A_T, so its export is the adapter itself
(rank r): the method's record says so through `EditMethod.net_update`.

Dense updates (FT-L, FT-M) and memory entries (GRACE) have no adapter form and are refused.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict, Field
from safetensors.torch import save_file
from transformers import AutoConfig

from seqedit.errors import SeqeditError
from seqedit.files import write_atomic
from seqedit.methods.arch import module_names_for_type
from seqedit.methods.config import validate_config
from seqedit.methods.registry import get_method
from seqedit.methods.updates import DenseDelta, LowRankDelta, MemoryEntry, Update
from seqedit.pipeline.campaign_dir.state import CampaignState
from seqedit.pipeline.cli.campaign_ops import frozen_spec, logs_through
from seqedit.schemas.campaign import CampaignSpec
from seqedit.storage import Where
from seqedit.workers.edit_log import parse_edit_log, read_edit_log

ADAPTER_CONFIG, ADAPTER_WEIGHTS, EXPORT_REPORT = (
    "adapter_config.json",
    "adapter_model.safetensors",
    "seqedit_export.json",
)


class ExportError(SeqeditError):
    """A campaign that cannot be exported as asked (its method, its steps, its files)."""


class ModuleExport(BaseModel):
    """How one module's change was written."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    module: str
    stacked_rank: int = Field(description="Columns of the stacked factors (k).")
    rank: int = Field(description="Rank written (before zero padding to the adapter's r).")
    relative_error: float = Field(
        description="||dW - written||_F / ||dW||_F: 0 when exact, the SVD's tail otherwise."
    )


class ExportReport(BaseModel):
    """What `export_peft` wrote (also saved as seqedit_export.json beside the adapter)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    campaign: str
    method: str
    through_step: int
    steps_with_updates: int
    r: int = Field(description="The adapter's rank (lora_alpha equals it: scale 1).")
    exact: bool
    max_relative_error: float
    modules: list[ModuleExport]


@dataclass
class Factors:
    """dW = left @ right.T of one module: left (d_out, k), right (d_in, k), float64."""

    left: torch.Tensor
    right: torch.Tensor


def logged_steps(campaign_dir: Where, spec: CampaignSpec, through_step: int) -> list[list[Update]]:
    """The updates of steps 0..through_step, in order (rolled-back steps give [])."""
    state = CampaignState.load(campaign_dir)
    if not 0 <= through_step < spec.n_steps:
        raise ExportError(f"--step {through_step}: the campaign has steps 0..{spec.n_steps - 1}")
    steps: dict[int, list[Update]] = {}
    for _shard, log_file in logs_through(campaign_dir, state, through_step):
        parsed = parse_edit_log(read_edit_log(log_file))
        steps |= {s: u for s, u in parsed.items() if s <= through_step}
    missing = [s for s in range(through_step + 1) if s not in steps]
    if missing:
        raise ExportError(
            f"{campaign_dir}: the edit log has no step {missing[0]} (the campaign stopped "
            f"after step {missing[0] - 1})"
        )
    return [steps[s] for s in range(through_step + 1)]


def refuse_non_low_rank(method: str, steps: list[list[Update]]) -> None:
    """Dense deltas and memory entries have no LoRA form: refuse with the reason."""
    for step, updates in enumerate(steps):
        for update in updates:
            if isinstance(update, DenseDelta):
                raise ExportError(
                    f"{method} logs dense weight changes (step {step}, {update.module}): a "
                    "full-rank change of a weight has no LoRA adapter form; rebuild the "
                    "model instead (`seqedit rebuild`)"
                )
            if isinstance(update, MemoryEntry):
                raise ExportError(
                    f"{method} edits through a memory (step {step}), not weights: there is "
                    "no adapter to export"
                )


def stacked(steps: list[list[Update]]) -> dict[str, Factors]:
    """Module -> its logged factors side by side (float64), in step order."""
    parts: dict[str, list[LowRankDelta]] = {}
    for updates in steps:
        for update in updates:
            assert isinstance(update, LowRankDelta)
            parts.setdefault(update.module, []).append(update)
    return {
        module: Factors(
            torch.cat([d.left.double() for d in deltas], dim=1),
            torch.cat([d.right.double() for d in deltas], dim=1),
        )
        for module, deltas in parts.items()
    }


def fitted(module: str, factors: Factors, rank: int | None) -> tuple[Factors, ModuleExport]:
    """The factors written for one module: as stacked when k <= the rank allowed, else the
    truncated SVD at it (computed from thin QRs of both factors: k x k, not d_out x d_in)."""
    (d_out, k), d_in = factors.left.shape, factors.right.shape[0]
    allowed = min(d_out, d_in) if rank is None else min(rank, d_out, d_in)
    if k <= allowed:
        return factors, ModuleExport(module=module, stacked_rank=k, rank=k, relative_error=0.0)
    q_left, r_left = torch.linalg.qr(factors.left)  # (d_out, k), (k, k)
    q_right, r_right = torch.linalg.qr(factors.right)  # (d_in, k), (k, k)
    u, s, vh = torch.linalg.svd(r_left @ r_right.T)
    total, kept = float(s.square().sum()), float(s[:allowed].square().sum())
    error = math.sqrt(max(total - kept, 0.0) / total) if total > 0 else 0.0
    left = q_left @ (u[:, :allowed] * s[:allowed])
    right = q_right @ vh[:allowed].T
    export = ModuleExport(module=module, stacked_rank=k, rank=allowed, relative_error=error)
    return Factors(left, right), export


def export_peft(
    campaign_dir: Where, through_step: int, out: Path, *, rank: int | None = None
) -> ExportReport:
    """Write the campaign's edits of steps 0..through_step to `out` as a PEFT LoRA adapter
    (`adapter_config.json`, `adapter_model.safetensors`) for the campaign's base model, and
    `seqedit_export.json` (the `ExportReport`)."""
    from peft import LoraConfig as PeftLoraConfig  # imported here: the CLI starts faster

    spec = frozen_spec(campaign_dir)
    method = get_method(spec.method)
    if rank is not None and rank < 1:
        raise ExportError(f"--rank {rank}: give a rank of 1 or more")
    logged = logged_steps(campaign_dir, spec, through_step)
    refuse_non_low_rank(method.name, logged)
    config = validate_config(method.config_cls, spec.hparams, where=f"{spec.name}: hparams")
    steps = logged if method.net_update is None else [method.net_update(config, logged)]
    per_module = {m: fitted(m, f, rank) for m, f in stacked(steps).items()}
    if not per_module:
        raise ExportError(f"{campaign_dir}: no edit landed in steps 0..{through_step}")
    r = max(export.rank for _, export in per_module.values())
    tensors = {}
    for module, (factors, _) in per_module.items():
        pad = r - factors.left.shape[1]
        b = torch.nn.functional.pad(factors.left, (0, pad)).float().contiguous()
        a = torch.nn.functional.pad(factors.right, (0, pad)).T.float().contiguous()
        tensors[f"base_model.model.{module}.lora_A.weight"] = a  # (r, d_in)
        tensors[f"base_model.model.{module}.lora_B.weight"] = b  # (d_out, r)
    model_type = AutoConfig.from_pretrained(spec.model, local_files_only=True).model_type
    names = config.module_names or module_names_for_type(model_type)
    peft_config = PeftLoraConfig(
        r=r,
        lora_alpha=r,
        lora_dropout=0.0,
        target_modules=sorted(per_module),
        fan_in_fan_out=names.rewrite_weight_transposed,
        bias="none",
        task_type="CAUSAL_LM",
        base_model_name_or_path=str(spec.model),
        inference_mode=True,
    )
    out.mkdir(parents=True, exist_ok=True)
    peft_config.save_pretrained(str(out))
    save_file(tensors, str(out / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    modules = [export for _, export in per_module.values()]
    report = ExportReport(
        campaign=spec.name,
        method=method.name,
        through_step=through_step,
        steps_with_updates=sum(bool(updates) for updates in logged),
        r=r,
        exact=all(m.rank == m.stacked_rank for m in modules),
        max_relative_error=max(m.relative_error for m in modules),
        modules=modules,
    )
    text = json.dumps(report.model_dump(), indent=2) + "\n"
    write_atomic(out / EXPORT_REPORT, lambda tmp: tmp.write_text(text))
    return report
