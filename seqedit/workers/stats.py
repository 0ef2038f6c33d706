"""Building second-moment (covariance) statistics from a text corpus in ONE pass.

``compute_stats`` accumulates the rewrite-module inputs of every requested layer in one
forward pass per batch (:func:`seqedit.methods.covariance.accumulate_second_moments`);
``seqedit.workers.stats_store`` keeps the result on disk with checked provenance.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from itertools import islice
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from seqedit import __version__
from seqedit.files import file_sha256
from seqedit.methods.covariance import (
    GPT2_REWRITE_MODULE_TMP,
    SecondMomentAccumulator,
    accumulate_second_moments,
)
from seqedit.workers.model_io import load_model, model_fingerprint

log = logging.getLogger(__name__)

STATS_FILE = "stats.safetensors"
META_FILE = "stats.json"
FORMAT_VERSION = 1
_SORT_WINDOW = 32  # batches per length-sorting window
_CONFIG_IN_META = set(
    ["layers", "n_samples", "seed", "batch_size", "add_special_tokens", "sort_by_length", "dtype"]
)
_DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "float64": torch.float64}


class CorpusError(ValueError):
    """A corpus file that cannot be read; the message names the file (and line)."""


class StatsStoreError(ValueError):
    """A stats directory that must not be used; the message names the file and field."""


class StatsConfig(BaseModel):
    """What to compute: layers, corpus, tokenisation and accumulation settings."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    layers: list[int] = Field(min_length=1)
    corpus: list[Path] = Field(
        min_length=1,
        description=".txt: one doc per non-empty line; "
        ".jsonl: one {'text': ...} object per non-empty line",
    )
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


def iter_documents(paths: list[Path]) -> Iterator[str]:
    """Yield documents in file order: a line of a text file, or the "text" of a JSONL line.

    Empty (whitespace-only) lines are skipped; a JSONL line that is not an object with a
    string "text" raises :class:`CorpusError` naming the file and line number.
    """
    for path in paths:
        jsonl = path.suffix.lower() == ".jsonl"
        try:
            handle = path.open(encoding="utf-8")
        except OSError as exc:
            raise CorpusError(f"{path}: cannot open corpus file: {exc}") from exc
        with handle:
            try:
                for lineno, raw in enumerate(handle, start=1):
                    line = raw.rstrip("\r\n")
                    if not line.strip():
                        continue
                    if not jsonl:
                        yield line
                        continue
                    try:
                        obj = json.loads(line)
                    except json.JSONDecodeError as exc:
                        raise CorpusError(f"{path}:{lineno}: invalid JSON: {exc}") from exc
                    if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
                        raise CorpusError(
                            f"{path}:{lineno}: expected an object with a string 'text' field"
                        )
                    if obj["text"].strip():
                        yield obj["text"]
            except UnicodeDecodeError as exc:
                raise CorpusError(f"{path}: not UTF-8 text: {exc}") from exc


def corpus_fingerprint(paths: list[Path]) -> str:
    """sha256 over each corpus file's name (not directory) and bytes, in the given order."""
    digest = hashlib.sha256()
    for path in paths:
        digest.update(path.name.encode() + b"\0")
        digest.update(file_sha256(path).encode())
    return digest.hexdigest()


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


def _batches(
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


def _model_context(model: torch.nn.Module) -> int:
    cfg = getattr(model, "config", None)
    for attr in ("max_position_embeddings", "n_positions", "n_ctx"):
        value = getattr(cfg, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    raise ValueError("cannot tell the model context length; set max_length")


# ----------------------------------------------------------------------------- compute


def compute_stats(
    model_dir: str | Path,
    config: StatsConfig,
    *,
    progress: bool = True,
    device: str | torch.device = "cpu",
) -> StatsResult:
    """One pass over the corpus accumulating Σ k kᵀ of every configured layer's rewrite input."""
    corpus = [Path(p) for p in config.corpus]
    n_docs = sum(1 for _ in iter_documents(corpus))  # also validates every line up front
    if n_docs == 0:
        raise CorpusError(f"{[str(p) for p in corpus]}: corpus has no documents")
    keep = select_documents(n_docs, config.n_samples, config.seed)
    n_used = n_docs if keep is None else len(keep)

    model, tokenizer = load_model(model_dir, device=device)
    max_length = config.max_length or _model_context(model)
    names = {layer: config.module_tmp.format(layer) for layer in config.layers}
    dtype = _DTYPES[config.dtype]

    kept = None if keep is None else set(keep)
    docs = (d for i, d in enumerate(iter_documents(corpus)) if kept is None or i in kept)

    bar = tqdm(total=n_used, unit="doc", desc="second moments", disable=not progress)
    tokens = 0
    start = time.perf_counter()

    def on_batch(n_seq: int, n_tok: int) -> None:
        nonlocal tokens
        tokens += n_tok
        bar.update(n_seq)
        bar.set_postfix(tok_s=f"{tokens / max(time.perf_counter() - start, 1e-9):.0f}")

    try:
        accs = accumulate_second_moments(
            model,
            _batches(docs, tokenizer, config, max_length),
            list(names.values()),
            dtype,
            on_batch=on_batch,
        )
    finally:
        bar.close()
    seconds = time.perf_counter() - start
    rate = tokens / max(seconds, 1e-9)
    log.info(
        "layers %s: %d docs, %d tok, %.1f s, %.0f tok/s",
        config.layers,
        n_used,
        tokens,
        seconds,
        rate,
    )
    meta = StatsMeta(
        seqedit_version=__version__,
        created_at=datetime.now(UTC),
        model_fingerprint=model_fingerprint(model_dir),
        model_dir=str(model_dir),
        module_names=names,
        corpus_files=[p.name for p in corpus],
        corpus_fingerprint=corpus_fingerprint(corpus),
        n_documents=n_used,
        max_length=max_length,
        token_count=tokens,
        seconds=seconds,
        **config.model_dump(include=_CONFIG_IN_META),
    )
    return StatsResult(accumulators={k: accs[v] for k, v in names.items()}, meta=meta)
