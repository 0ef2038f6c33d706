"""CovarianceWorker: the second-moment sums of one shard of a corpus, on one loaded model.

A plain class (no Ray): `compute_stats` runs one in-process over the whole corpus, and the
pipeline's sharded job (`pipeline.stats_job`) runs several as Ray actors, one shard at a
time each. A shard is a sorted list of document indices; the worker reads exactly those
documents from the corpus itself (streaming), so memory is bounded by the batch, not by
the corpus or the shard.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict, Field

from seqedit.methods.covariance import SecondMomentAccumulator, accumulate_second_moments
from seqedit.methods.keys_values import modules_io_at_subjects
from seqedit.workers.corpus import CorpusError, read_documents
from seqedit.workers.model_io import load_model
from seqedit.workers.stats import DTYPES, StatsConfig, document_batches, model_context


class ShardSums(BaseModel):
    """The partial sums of one shard: per layer Σ k kᵀ (d_in, d_in) and its token count."""

    model_config = ConfigDict(arbitrary_types_allowed=True, frozen=True)

    index: int
    sums: dict[int, torch.Tensor]
    counts: dict[int, int]
    tokens: int = Field(description="Non-pad tokens of the shard (the count of every layer).")
    documents: int
    seconds: float
    node: str | None = Field(default=None, description="Where it was computed (Ray node).")

    def accumulators(self) -> dict[int, SecondMomentAccumulator]:
        """Layer -> an accumulator holding this shard's sum and count (copies)."""
        return {
            layer: SecondMomentAccumulator.from_state(self.sums[layer], self.counts[layer])
            for layer in self.sums
        }


class CovarianceWorker:
    """Holds one model; sums k kᵀ of every configured layer's rewrite input over a shard.

    Args:
        model_dir: local Hugging Face model directory.
        config: what to compute (layers, corpus, batching, dtype).
        device: where the model runs and the sums accumulate.
        torch_threads: intra-op threads for this worker (None keeps the current setting).
    """

    def __init__(
        self,
        model_dir: str | Path,
        config: StatsConfig,
        *,
        device: str | torch.device = "cpu",
        torch_threads: int | None = None,
    ) -> None:
        if torch_threads is not None:
            torch.set_num_threads(torch_threads)
        self.config = config
        self.model, self.tokenizer = load_model(model_dir, device=device)
        self.max_length = config.max_length or model_context(self.model)
        self.names = {layer: config.module_tmp.format(layer) for layer in config.layers}

    def run_shard(
        self,
        index: int,
        documents: Sequence[int],
        *,
        on_batch: Callable[[int, int], None] | None = None,
    ) -> ShardSums:
        """The sums over the corpus documents at `documents` (sorted indices), one forward
        pass per batch for every layer (stopped after the last layer's input)."""
        started = time.perf_counter()
        texts = (
            text
            for _, text in read_documents(
                self.config.corpus, documents, text_column=self.config.text_column
            )
        )
        accumulators = accumulate_second_moments(
            self.model,
            document_batches(texts, self.tokenizer, self.config, self.max_length),
            list(self.names.values()),
            DTYPES[self.config.dtype],
            on_batch=on_batch,
        )
        sums, counts = {}, {}
        for layer, name in self.names.items():
            accumulator = accumulators[name]
            if accumulator.sum is None:
                raise CorpusError(f"shard {index}: no tokens reached {name} (empty documents?)")
            sums[layer], counts[layer] = accumulator.sum.detach().cpu(), accumulator.count
        return ShardSums(
            index=index,
            sums=sums,
            counts=counts,
            tokens=next(iter(counts.values())),
            documents=len(documents),
            seconds=time.perf_counter() - started,
        )

    def probe_keys(
        self, prompts: Sequence[str], subjects: Sequence[str]
    ) -> dict[int, torch.Tensor]:
        """Layer -> (n, d_in) float32 keys of edit requests: each layer's rewrite-module
        input at the last subject token of `prompt` ("{}" the subject) filled with its
        subject, on the CPU (what `--until-stable` watches C^-1 k and P k of)."""
        if len(prompts) != len(subjects) or not prompts:
            raise ValueError(f"{len(prompts)} prompts and {len(subjects)} subjects")
        modules = [self.names[layer] for layer in sorted(self.names)]
        found = modules_io_at_subjects(
            self.model, self.tokenizer, list(prompts), list(subjects), modules, "subject_last"
        )
        return {layer: io[0].cpu() for layer, io in zip(sorted(self.names), found, strict=True)}
