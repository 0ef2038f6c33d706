"""The data of causal tracing (`seqedit.methods.tracing`): its settings, the six token rows
a record's effects are averaged into, and the result a trace returns.

Per record the (T, L) effects become the rows of `ROW_LABELS` (several tokens: their
mean; none, as the middle of a one-token subject: the row is absent), and a row's average
indirect effect (AIE) is its mean over the records that have it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

TraceKind = Literal["hidden", "mlp", "attn"]
KINDS: tuple[TraceKind, ...] = ("hidden", "mlp", "attn")
ROW_LABELS = ("first subject token", "middle subject tokens", "last subject token",
              "first subsequent token", "further tokens", "last token")  # fmt: skip
LAST_SUBJECT_ROW, LAST_TOKEN_ROW = 2, 5


class TraceSettings(BaseModel):
    """How facts are traced (defaults: the reference's)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    samples: int = Field(default=10, ge=1, description="Noisy copies of each prompt.")
    noise: float = Field(default=3.0, ge=0, description="Noise std / subject embeddings' std.")
    window: int = Field(default=10, ge=1, description="MLP/attn layers restored together.")
    seed: int = Field(default=0, description="Seed of the noise generator.")
    max_batch: int = Field(default=128, ge=1, description="Rows of one forward pass.")


def token_rows(effects: torch.Tensor, first: int, last: int) -> list[torch.Tensor | None]:
    """The six `ROW_LABELS` rows (each (L,)) of one record's (T, L) effects, the subject
    on tokens first..last; a row with no token is None."""
    n_tokens = effects.shape[0]

    def mean(start: int, stop: int) -> torch.Tensor | None:
        return effects[start:stop].mean(0) if stop > start else None

    after = last + 1
    return [
        effects[first],
        mean(first + 1, last),
        effects[last],
        mean(after, min(after + 1, n_tokens)),
        mean(after + 1, n_tokens - 1),
        effects[n_tokens - 1],
    ]


def average_rows(
    per_record: Sequence[Sequence[torch.Tensor | None]],
) -> tuple[list[torch.Tensor | None], list[int]]:
    """Mean of each row over the records that have it, and how many records that is."""
    rows: list[torch.Tensor | None] = []
    counts: list[int] = []
    for index in range(len(ROW_LABELS)):
        present = [r[index] for r in per_record if r[index] is not None]
        rows.append(torch.stack(present).mean(0) if present else None)  # type: ignore[arg-type]
        counts.append(len(present))
    return rows, counts


class BestLayers(BaseModel):
    """The layer of the largest AIE of one kind at two token rows."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    last_subject: int = Field(description="Layer of max AIE at the last subject token.")
    last_token: int = Field(description="Layer of max AIE at the last prompt token.")


class TracedFact(BaseModel):
    """One traced record: its clean and corrupted P(target)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    case_id: int
    p_clean: float
    p_corrupt: float
    subject_tokens: tuple[int, int] = Field(description="First and last subject token.")


class TraceResult(BaseModel):
    """Average indirect effects of restoring each kind of state, over the known facts."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    model: str
    n_layer: int
    settings: TraceSettings
    window: int = Field(description="MLP/attention layers restored together, as used.")
    noise_std: float = Field(description="Absolute noise std: settings.noise x embedding std.")
    n_records: int = Field(description="Records read.")
    n_traced: int = Field(description="Records traced: the facts the model knows.")
    skipped_unknown: list[int] = Field(description="case_ids the model does not know.")
    skipped_no_target: list[int] = Field(description="case_ids without target_true.")
    p_clean: float = Field(description="Mean clean P(target) over the traced facts.")
    p_corrupt: float = Field(description="Mean corrupted P(target).")
    row_labels: list[str]
    row_records: list[int] = Field(description="Traced facts contributing to each row.")
    aie: dict[str, list[list[float] | None]] = Field(
        description="kind -> one list of n_layer AIEs per row (None: no fact has the row)."
    )
    best_layers: dict[str, BestLayers]
    facts: list[TracedFact]
