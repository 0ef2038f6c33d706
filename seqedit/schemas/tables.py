"""Row models of every table we write, and their Arrow schemas (derived, never hand-kept).

A row model is a pydantic class; `arrow_schema(Row)` turns its fields into an Arrow schema,
so column names and types live in exactly one place. Tables are partitioned on disk by
shard and attempt (hive style), so those two are not columns of the rows themselves.
"""

from __future__ import annotations

import types
from typing import Literal, Union, get_args, get_origin

import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field

Protocol = Literal["immediate", "retention", "final"]
"""How a metric row was produced.

immediate: scored right after the edit itself was applied (before any later edit).
retention: all records edited so far, scored at a checkpoint after `n_edits_applied` edits.
final: all edited records, scored after the last edit of the campaign.
"""


class EditRow(BaseModel):
    """One applied edit: what the optimisation did and what the rewrite prompt says."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    campaign: str
    step: int = Field(description="0-based position of the edit in the campaign.")
    case_id: int
    method: str
    method_version: str
    layers: str | None = Field(
        default=None,
        description="Written before edit contract v2 only: edited layers, comma separated "
        "(now `modules`).",
    )
    modules: str | None = Field(
        default=None,
        description="Edited modules (weights), comma separated; empty for a memory-based "
        "method. NULL in rows written before edit contract v2 (see `layers`).",
    )
    p_new_before: float = Field(description="P(target_new | rewrite prompt) before the edit.")
    p_true_before: float | None
    p_new_after: float = Field(description="P(target_new | rewrite prompt) after the edit.")
    p_true_after: float | None
    success: bool = Field(description="After the edit, P(new) > P(true) (immediate efficacy).")
    loss_initial: float = Field(description="Value-optimisation loss at its first step.")
    loss: float = Field(description="Value-optimisation loss at its last step.")
    opt_steps: int
    update_norm: float | None = Field(
        description="Frobenius norm of this edit's weight update (NULL for a memory-based "
        "method, which changes no weight)."
    )
    weight_drift: float | None = Field(
        description="max over edited modules of ||W_t - W_0||_F / ||W_0||_F (NULL for a "
        "memory-based method)."
    )
    memory_size: int | None = Field(
        default=None,
        description="Entries in a memory-based method's memory after the edit (GRACE's "
        "codebook keys); NULL for methods that edit weights.",
    )
    seconds: float = Field(description="Wall time of the edit (optimisation + update).")
    check_seconds: float = Field(
        default=0.0,
        description="Of `seconds`, the per-edit health work: scoring the edit after it "
        "(verification), the weight drift, and the undo snapshot a rollback policy needs.",
    )
    rolled_back: bool = Field(
        default=False, description="A health policy undid this edit (it is not in the model)."
    )
    retries: int = Field(
        default=0, description="Times a health policy redid this edit before this result."
    )
    node: str | None = Field(default=None, description="Ray node id of the editor.")


class EvalRow(BaseModel):
    """CounterFact metrics of one edited record at one point of the campaign."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    campaign: str
    protocol: Protocol
    n_edits_applied: int = Field(description="Edits applied to the model when it was scored.")
    case_id: int
    relation_id: str | None = Field(
        default=None, description="The record's relation (CounterFact's P-id), if known."
    )
    edit_step: int = Field(description="Step at which this record was edited.")
    metric_version: str
    es: float | None = Field(description="Efficacy: [P(new) > P(true)] on the rewrite prompt.")
    ps: float | None = Field(description="Paraphrase: mean [P(new) > P(true)] on paraphrases.")
    ns: float | None = Field(description="Neighbourhood: mean [P(true) > P(new)] on neighbours.")
    em: float | None = Field(description="Efficacy magnitude: P(new) - P(true), rewrite prompt.")
    pm: float | None = Field(description="Paraphrase magnitude: mean P(new) - P(true).")
    nm: float | None = Field(description="Neighbourhood magnitude: mean P(true) - P(new).")
    rewrite_acc: float = Field(description="Teacher-forced token accuracy of target_new.")
    rephrase_acc: float | None = Field(
        default=None, description="Mean token accuracy of target_new on the paraphrases."
    )
    locality_acc: float | None = Field(
        default=None,
        description="Mean token accuracy of each neighbour's own answer (zsRE specificity).",
    )
    locality_agreement: float | None = Field(
        default=None,
        description="EasyEdit locality: mean share of neighbour-answer positions whose "
        "argmax token is the base model's (agreement, not accuracy).",
    )
    portability_acc: float | None = Field(
        default=None, description="Mean token accuracy of the portability answers."
    )
    fluency: float | None = Field(
        default=None,
        description="Weighted bi/tri-gram entropy (bits) of the record's generations "
        "(ROME's fluency / 100); only for the records sampled for generation.",
    )
    n_paraphrases: int
    n_neighbors: int
    n_portability: int = 0
    node: str | None = Field(default=None, description="Ray node id of the evaluator.")


_ARROW_TYPES: dict[type, pa.DataType] = {
    int: pa.int64(),
    float: pa.float64(),
    str: pa.string(),
    bool: pa.bool_(),
}


def _arrow_type(annotation: object) -> tuple[pa.DataType, bool]:
    """Map a field annotation to (arrow type, nullable)."""
    origin = get_origin(annotation)
    if origin in (Union, types.UnionType):
        args = [a for a in get_args(annotation) if a is not type(None)]
        if len(args) != 1:
            raise TypeError(f"unsupported union {annotation!r}")
        return _arrow_type(args[0])[0], True
    if origin is Literal:
        return pa.string(), False
    if isinstance(annotation, type) and annotation in _ARROW_TYPES:
        return _ARROW_TYPES[annotation], False
    raise TypeError(f"no Arrow type for {annotation!r}")


def arrow_schema(row_model: type[BaseModel]) -> pa.Schema:
    """The Arrow schema of a row model, field by field, in declaration order."""
    fields = []
    for name, info in row_model.model_fields.items():
        arrow_type, nullable = _arrow_type(info.annotation)
        fields.append(pa.field(name, arrow_type, nullable=nullable))
    return pa.schema(fields)


class TrainRow(BaseModel):
    """One metric of a trained editor's training job at one step (`seqedit train`): the
    `train` table, one part per validation (`<out>/train/rows-<step>.parquet`)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    step: int = Field(description="Optimiser steps taken when it was measured.")
    split: str = Field(description="`train` (that step's batch) or `val` (the validation set).")
    name: str = Field(
        description="edit/acc, loss/edit, loss/loc, loss/total, acc/pre, acc/post, nll/pre, "
        "nll/post, time/step, time/edit (training seconds per edit example: time/step over "
        "the global batch), lr/edit.<i> (a learned edit learning rate)."
    )
    value: float
    seconds: float = Field(description="Training time so far (across restarts).")
    workers: int = Field(description="Data-parallel Ray Train workers.")


HealthAction = Literal["record", "retry", "skip", "stop"]
"""What a failed health check does: keep a row only; redo the edit with more optimisation
steps and another seed (rolling it back if every retry fails too); roll the edit back; or
stop the run at the last healthy state."""


class HealthRow(BaseModel):
    """One health-check result after one edit (every check of every edit is a row)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    campaign: str
    step: int = Field(description="The edit after which the check ran.")
    case_id: int
    check_name: str = Field(
        description="Per edit: verified, update_norm, success_rate, target_prob. Periodic: "
        "retention, locality_kl, locality_top1, perplexity, perplexity_ratio, "
        "weight_drift.<module>."
    )
    value: float = Field(description="What was measured (NaN while a window fills).")
    threshold: float | None = Field(description="The limit it was held to.")
    passed: bool
    action: str = Field(
        description="none, or the policy applied on failure: record/retry/skip/stop."
    )
    retry: int = Field(
        default=0, description="Which try of the edit this check judged (0: the first)."
    )
    seconds: float = Field(
        default=0.0,
        description="Wall time of the measurement, shared evenly by the rows it produced "
        "(per-edit checks reuse the edit's own scores: 0).",
    )


class ModelEvalRow(BaseModel):
    """A metric of the whole model (not of one record) at one evaluation point."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    campaign: str
    protocol: Protocol
    n_edits_applied: int
    metric: str = Field(description="perplexity: held-out text; see methods.metrics.METRICS.")
    value: float
    metric_version: str
    n_items: int = Field(description="Texts (or prompts) the value is computed over.")
    seconds: float = Field(description="Wall time of the measurement.")


TABLES: dict[str, type[BaseModel]] = {
    "edits": EditRow,
    "evals": EvalRow,
    "health": HealthRow,
    "model_evals": ModelEvalRow,
}
"""Every table of a campaign, by name: the DuckDB view of the same name reads it."""
