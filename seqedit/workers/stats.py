"""Building second-moment (covariance) statistics from a text corpus in ONE pass.

``compute_stats`` accumulates the rewrite-module inputs of every requested layer in one
forward pass per batch (:func:`seqedit.methods.covariance.accumulate_second_moments`);
``seqedit.workers.stats_store`` keeps the result on disk with checked provenance.
"""

from __future__ import annotations

import logging
import os
import random
import time
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from itertools import islice
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from seqedit import __version__
from seqedit.errors import SeqeditError
from seqedit.methods.covariance import (
    GPT2_REWRITE_MODULE_TMP,
    SecondMomentAccumulator,
)
from seqedit.workers.corpus import (
    CorpusError,
    corpus_fingerprint,
    count_documents,
    source_name,
)
from seqedit.workers.model_io import ModelDirError, model_fingerprint

log = logging.getLogger(__name__)

STATS_FILE = "stats.safetensors"
META_FILE = "stats.json"
FORMAT_VERSION = 1
_SORT_WINDOW = 32  # batches per length-sorting window
_CONFIG_IN_META = set(
    ["layers", "n_samples", "seed", "batch_size", "add_special_tokens", "sort_by_length", "dtype"]
)
DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "float64": torch.float64}


class StatsStoreError(SeqeditError, ValueError):
    """A stats directory that must not be used; the message names the file and field."""


class StatsConfig(BaseModel):
    """What to compute: layers, corpus, tokenisation and accumulation settings."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    layers: list[int] = Field(min_length=1)
    corpus: list[str] = Field(
        min_length=1,
        description="Sources in order (`workers.corpus`): .txt (a document per non-empty "
        "line), .jsonl / .parquet (column `text_column`), a Hugging Face dataset saved on "
        "disk; local paths or pyarrow filesystem URIs.",
    )
    text_column: str = Field(default="text", min_length=1)
    module_tmp: str = GPT2_REWRITE_MODULE_TMP
    max_length: int | None = Field(default=None, gt=0, description="None: model context")
    batch_size: int = Field(default=64, gt=0)
    dtype: Literal["float32", "float64"] = "float64"
    n_samples: int | None = Field(default=None, gt=0, description="None: every document")
    seed: int = 0
    add_special_tokens: bool = Field(
        default=True, description="the tokenizer's own default (GPT-2 adds no bos/eos)"
    )
    sort_by_length: bool = Field(
        default=True, description="batch documents of similar length (less padding)"
    )

    @field_validator("corpus", mode="before")
    @classmethod
    def _paths_as_text(cls, v: object) -> object:
        if not isinstance(v, list):
            return v
        return [str(p) if isinstance(p, os.PathLike) else p for p in v]

    @field_validator("layers")
    @classmethod
    def _layers_ok(cls, v: list[int]) -> list[int]:
        if any(layer < 0 for layer in v) or len(set(v)) != len(v):
            raise ValueError(f"layers must be distinct and >= 0, got {v}")
        return sorted(v)

    @field_validator("module_tmp")
    @classmethod
    def _tmp_ok(cls, v: str) -> str:
        if v.count("{}") != 1:
            raise ValueError(f"module_tmp needs exactly one '{{}}', got {v!r}")
        return v


class StatsMeta(BaseModel):
    """Provenance of a stats file (sidecar ``stats.json`` and safetensors metadata)."""

    model_config = ConfigDict(extra="forbid")

    format_version: int = FORMAT_VERSION
    seqedit_version: str
    created_at: datetime
    model_fingerprint: str
    model_dir: str
    layers: list[int]
    module_names: dict[int, str]
    corpus_files: list[str]
    corpus_fingerprint: str
    n_documents: int
    n_samples: int | None
    seed: int
    max_length: int
    batch_size: int
    add_special_tokens: bool
    sort_by_length: bool
    token_count: int
    dtype: Literal["float32", "float64"]
    seconds: float
    sha256: str | None = None
    imported_from: dict[str, Any] | None = None
    """Set by `seqedit stats import`: the source files' format, sha256s, dataset names,
    sample sizes and token counts (the corpus fields above are then placeholders)."""

    until_stable: dict[str, Any] | None = None
    """Set by `stats build --until-stable`: the threshold, the probes, the shards used of
    the total, and each prefix's tokens and relative changes (`stats_until_stable`)."""

    def json_text(self, **kwargs: Any) -> str:
        """The JSON of this record; `imported_from` and `until_stable` only when set
        (other stats keep the layout they always had)."""
        unset = {name for name in ("imported_from", "until_stable") if getattr(self, name) is None}
        return self.model_dump_json(exclude=unset or None, **kwargs)


class StatsResult(BaseModel):
    """Accumulators per layer (sums (d_in, d_in) and counts) with their provenance."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    accumulators: dict[int, SecondMomentAccumulator]
    meta: StatsMeta

    def moments(self, dtype: torch.dtype | None = None) -> dict[int, torch.Tensor]:
        """Layer -> C = sum / count, shape (d_in, d_in), optionally cast to ``dtype``."""
        out = {layer: acc.moment() for layer, acc in self.accumulators.items()}
        return out if dtype is None else {k: v.to(dtype) for k, v in out.items()}


# ----------------------------------------------------------------------------- corpus


def select_documents(n_documents: int, n_samples: int | None, seed: int) -> list[int] | None:
    """Sorted indices of a deterministic ``n_samples`` subset (None: keep every document)."""
    if n_samples is None or n_samples >= n_documents:
        return None
    return sorted(random.Random(seed).sample(range(n_documents), n_samples))


def _pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token rows into ``input_ids`` (B, T) and ``attention_mask`` (B, T)."""
    width = max(1, *(len(row) for row in rows))
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        mask[i, : len(row)] = 1
    return ids, mask


def document_batches(
    docs: Iterator[str], tokenizer: PreTrainedTokenizerBase, config: StatsConfig, max_length: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Right-padded (B, T) ids and mask of ``batch_size`` documents truncated to ``max_length``.

    With ``sort_by_length``, documents are grouped by token length within windows of
    ``_SORT_WINDOW`` batches (less padding; only the summation order changes).
    """
    window = config.batch_size * (_SORT_WINDOW if config.sort_by_length else 1)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    while chunk := list(islice(docs, window)):
        enc = tokenizer(
            chunk,
            truncation=True,
            max_length=max_length,
            add_special_tokens=config.add_special_tokens,
        )
        rows: list[list[int]] = list(enc["input_ids"])
        if config.sort_by_length:
            rows.sort(key=len)
        for i in range(0, len(rows), config.batch_size):
            yield _pad(rows[i : i + config.batch_size], pad_id)


def model_context(model: torch.nn.Module) -> int:
    """The context length of a loaded model (what documents are truncated to by default)."""
    return context_length(getattr(model, "config", None))


def context_length(model_config: object) -> int:
    """The context length a Hugging Face model config declares."""
    for attr in ("max_position_embeddings", "n_positions", "n_ctx"):
        value = getattr(model_config, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    raise ModelDirError("cannot tell the model context length; set max_length")


# ----------------------------------------------------------------------------- compute


def compute_stats(
    model_dir: str | Path,
    config: StatsConfig,
    *,
    progress: bool = True,
    device: str | torch.device = "cpu",
) -> StatsResult:
    """One pass over the corpus accumulating Σ k kᵀ of every configured layer's rewrite
    input, in this process (`pipeline.stats_job` shards the same work across actors)."""
    from seqedit.workers.covariance_worker import CovarianceWorker  # it imports this module

    chosen = selected_documents(config)
    worker = CovarianceWorker(model_dir, config, device=device)
    bar = tqdm(total=len(chosen), unit="doc", desc="second moments", disable=not progress)
    tokens = 0
    start = time.perf_counter()

    def on_batch(n_seq: int, n_tok: int) -> None:
        nonlocal tokens
        tokens += n_tok
        bar.update(n_seq)
        bar.set_postfix(tok_s=f"{tokens / max(time.perf_counter() - start, 1e-9):.0f}")

    try:
        shard = worker.run_shard(0, chosen, on_batch=on_batch)
    finally:
        bar.close()
    seconds = time.perf_counter() - start
    log.info("layers %s: %d docs, %d tok, %.1f s, %.0f tok/s", config.layers, len(chosen),
             shard.tokens, seconds, shard.tokens / max(seconds, 1e-9))  # fmt: skip
    meta = stats_meta(model_dir, config, worker.max_length, len(chosen), shard.tokens, seconds)
    return StatsResult(accumulators=shard.accumulators(), meta=meta)


def selected_documents(config: StatsConfig) -> Sequence[int]:
    """Indices of the corpus documents the stats are computed over: every document (a
    range, whatever the corpus size), or the seeded sample of `n_samples` (sorted). Reads
    the whole corpus once (and so validates it)."""
    n_docs = count_documents(config.corpus, text_column=config.text_column)
    if n_docs == 0:
        raise CorpusError(f"{[str(p) for p in config.corpus]}: corpus has no documents")
    keep = select_documents(n_docs, config.n_samples, config.seed)
    return range(n_docs) if keep is None else keep


def stats_meta(
    model_dir: str | Path,
    config: StatsConfig,
    max_length: int,
    n_documents: int,
    tokens: int,
    seconds: float,
    *,
    corpus_fp: str | None = None,
) -> StatsMeta:
    """The provenance of stats computed with `config` over `n_documents` documents
    (`corpus_fp`: the corpus fingerprint, when the caller has it already)."""
    return StatsMeta(
        seqedit_version=__version__,
        created_at=datetime.now(UTC),
        model_fingerprint=model_fingerprint(model_dir),
        model_dir=str(model_dir),
        module_names={layer: config.module_tmp.format(layer) for layer in config.layers},
        corpus_files=[source_name(p) for p in config.corpus],
        corpus_fingerprint=corpus_fp
        or corpus_fingerprint(config.corpus, text_column=config.text_column),
        n_documents=n_documents,
        max_length=max_length,
        token_count=tokens,
        seconds=seconds,
        **config.model_dump(include=_CONFIG_IN_META),
    )
