"""Training the testbed: the model, the training loop and recall checks (its tokenizer and
packed rows are in `text`).

Deterministic for a seed on a given machine, torch version and thread count: the model is
initialised under a forked, seeded RNG and batches come from a private `torch.Generator`.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator
from tqdm.auto import tqdm
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    GPTJConfig,
    GPTNeoXConfig,
    LlamaConfig,
    MistralConfig,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

from seqedit.schemas.requests import spaced
from seqedit.testbed.checkpoint import TrainingCheckpoint, TrainingProgress
from seqedit.testbed.text import PackedRows

log = logging.getLogger(__name__)


TestbedArchitecture = Literal["gpt2", "gptj", "gpt_neox", "llama", "mistral", "qwen2"]


class TestbedConfig(BaseModel):
    """Model size and training schedule of a testbed (defaults: CounterFact/synthetic-300)."""

    __test__: ClassVar[bool] = False  # not a pytest test class, despite the name
    model_config = ConfigDict(frozen=True, extra="forbid")

    architecture: TestbedArchitecture = Field(
        default="gpt2", description="Model family (`model_type`) of the testbed model."
    )
    n_layer: int = Field(default=4, ge=3, description="Transformer blocks (ROME edits 1-2).")
    n_embd: int = Field(default=128, ge=8, description="Model width.")
    n_head: int = Field(default=4, ge=1)
    n_positions: int = Field(default=128, ge=16, description="Context length of the model.")
    vocab_size: int = Field(default=4000, ge=300, description="BPE vocabulary size (at most).")
    steps: int = Field(default=400, ge=1, description="Maximum optimiser steps.")
    batch_size: int = Field(default=32, ge=1, description="Rows per batch.")
    seq_len: int = Field(default=64, ge=8, description="Tokens per row (packed statements).")
    lr: float = Field(default=5e-3, gt=0, description="Peak AdamW learning rate.")
    warmup_steps: int = Field(default=50, ge=0, description="Linear warm-up, then linear decay.")
    weight_decay: float = Field(default=0.0, ge=0)
    grad_clip: float = Field(default=1.0, gt=0)
    context_prob: float = Field(
        default=0.25,
        ge=0,
        le=1,
        description="Share of statements trained after a context fragment ('The mother tongue "
        "of. {}'), so facts hold inside text as ROME's context templates need.",
    )
    max_phrasings: int = Field(
        default=0,
        ge=0,
        description="Extra phrasings of each fact's relation (`testbed.phrasings`) trained per "
        "subject, so facts live with the subject as in large LMs (0: none).",
    )
    english_share: float = Field(
        default=0.5,
        ge=0,
        lt=1,
        description="With an English text: the share of training items that are English "
        "sentences (the rest are facts).",
    )
    english_train: int = Field(
        default=40_000, ge=1, description="With an English text: sentences trained on."
    )
    english_heldout: int = Field(
        default=1_000, ge=1, description="With an English text: sentences held out (perplexity)."
    )
    eval_every: int = Field(default=25, ge=1, description="Steps between recall checks.")
    recall_sample: int = Field(
        default=2_000,
        ge=1,
        description="Rewrite prompts a recall check scores (the first ones; the report "
        "scores all), so that the checks of a 10,000-fact build stay cheap.",
    )
    target_recall: float | None = Field(
        default=0.97, gt=0, le=1, description="Stop once rewrite recall reaches this (None: never)."
    )
    fast_training: bool = Field(
        default=False,
        description="The same training to float rounding in about 10 % less time per "
        "step: the LM head scores labelled positions only, and GPT-2/GPT-J run the tanh "
        "GELU as one fused kernel (gelu_pytorch_tanh). Off by default, so that configs "
        "made before it keep their exact weights.",
    )
    seed: int = 0

    @model_validator(mode="after")
    def _check_shapes(self) -> TestbedConfig:
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd {self.n_embd} is not divisible by n_head {self.n_head}")
        if self.seq_len > self.n_positions:
            raise ValueError(f"seq_len {self.seq_len} exceeds n_positions {self.n_positions}")
        return self

    @classmethod
    def for_facts(cls, n_facts: int) -> TestbedConfig:
        """The default configuration with a schedule long enough for `n_facts` facts: the
        defaults' 400 steps up to 300 facts, then steps in proportion (a 1,000-fact world
        reaches 50% recall in 400 steps), in whole recall-check intervals."""
        default = cls()
        wanted = math.ceil(default.steps * n_facts / 300 / default.eval_every) * default.eval_every
        return default.model_copy(update={"steps": max(default.steps, wanted)})

    @classmethod
    def language_model(cls, n_facts: int) -> TestbedConfig:
        """The default for a dataset testbed trained on English as well as its facts
        (measured on CounterFact, docs/methods.md): a 6,000-token vocabulary, each fact in
        6 more phrasings of its relation, half the items English, 1,000 steps up to 300
        facts and in proportion beyond."""
        steps = max(1000, math.ceil(1000 * n_facts / 300 / 100) * 100)
        return cls(
            vocab_size=6000,
            max_phrasings=6,
            english_share=0.5,
            eval_every=100,
            steps=steps,
            fast_training=True,
        )

    @classmethod
    def tiny(cls, seed: int = 0) -> TestbedConfig:
        """A fast configuration for tests: ~50 facts in seconds, still 4 layers."""
        return cls(
            n_embd=64,
            n_head=4,
            vocab_size=1000,
            steps=400,
            batch_size=16,
            lr=1e-2,
            warmup_steps=20,
            eval_every=20,
            target_recall=1.0,
            seed=seed,
        )


class RecallPoint(BaseModel):
    """One periodic evaluation during training."""

    model_config = ConfigDict(frozen=True)

    step: int
    loss: float = Field(description="Mean training loss since the previous point.")
    recall: float
    seconds: float = Field(description="Wall seconds since training started.")


@torch.no_grad()
def first_token_hits(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerFast,
    prompts: Sequence[str],
    targets: Sequence[str],
    *,
    batch_size: int = 256,
) -> list[bool]:
    """For each prompt: is the first token of `spaced(target)` the argmax next token?

    Prompts are encoded without special tokens, right-padded (harmless under causal
    attention) and read at their own last position.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    hits: list[bool] = []
    for start in range(0, len(prompts), batch_size):
        chunk = [
            tokenizer.encode(p, add_special_tokens=False)
            for p in prompts[start : start + batch_size]
        ]
        wanted = [
            tokenizer.encode(spaced(t), add_special_tokens=False)[0]
            for t in targets[start : start + batch_size]
        ]
        ids = torch.full((len(chunk), max(map(len, chunk))), tokenizer.pad_token_id or 0)
        mask = torch.zeros_like(ids)
        for i, enc in enumerate(chunk):
            ids[i, : len(enc)] = torch.tensor(enc)
            mask[i, : len(enc)] = 1
        last = torch.tensor([len(enc) - 1 for enc in chunk])
        out = model(ids.to(device), attention_mask=mask.to(device))
        logits = out.logits[torch.arange(len(chunk)), last.to(device)]  # (b, V)
        hits += (logits.argmax(-1).cpu() == torch.tensor(wanted)).tolist()
    model.train(was_training)
    return hits


def in_context_prompts(prompts: Sequence[str], statements: Sequence[str]) -> list[str]:
    """Each prompt after a deterministic context fragment: the first 1-4 words of another
    statement and ". " (the shape of ROME's context templates)."""
    out = []
    for i, prompt in enumerate(prompts):
        words = statements[(7 * i + 1) % len(statements)].split()
        out.append(" ".join(words[: 1 + i % 4]) + ". " + prompt)
    return out


def mean_or_none(values: Sequence[bool]) -> float | None:
    return sum(values) / len(values) if values else None


def pair_recall(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerFast, pairs: list[tuple[str, str]]
) -> float | None:
    """Recall over (prompt, target) pairs; None when there are none."""
    if not pairs:
        return None
    prompts, targets = zip(*pairs, strict=True)
    return mean_or_none(first_token_hits(model, tokenizer, prompts, targets))


def _lr_factor(step: int, config: TestbedConfig) -> float:
    warm = config.warmup_steps
    if step < warm:
        return (step + 1) / warm
    return max(0.0, (config.steps - step) / max(1, config.steps - warm))


class TrainRun(BaseModel):
    """What the training loop did."""

    steps: int
    stopped_early: bool
    final_loss: float
    seconds: float
    history: list[RecallPoint]


def _hf_config(config: TestbedConfig, vocab_size: int, eos_id: int) -> PretrainedConfig:
    """The Hugging Face config of `config.architecture` at the testbed's shape, no dropout."""
    special = {"bos_token_id": eos_id, "eos_token_id": eos_id, "pad_token_id": eos_id}
    width, layers, heads = config.n_embd, config.n_layer, config.n_head
    gpt_like: dict[str, Any] = {
        "vocab_size": vocab_size, "n_positions": config.n_positions, "n_embd": width,
        "n_layer": layers, "n_head": heads, "resid_pdrop": 0.0, "embd_pdrop": 0.0,
        "attn_pdrop": 0.0, **special,
    }  # fmt: skip
    if config.fast_training:
        gpt_like["activation_function"] = "gelu_pytorch_tanh"
    if config.architecture == "gpt2":
        return GPT2Config(**gpt_like)
    if config.architecture == "gptj":
        return GPTJConfig(**gpt_like, rotary_dim=width // heads, tie_word_embeddings=False)
    if config.architecture == "gpt_neox":
        return GPTNeoXConfig(
            vocab_size=vocab_size,
            max_position_embeddings=config.n_positions,
            hidden_size=width,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            intermediate_size=4 * width,
            hidden_dropout=0.0,
            attention_dropout=0.0,
            **special,
        )
    llama_like = {
        "vocab_size": vocab_size, "max_position_embeddings": config.n_positions,
        "hidden_size": width, "num_hidden_layers": layers, "num_attention_heads": heads,
        "num_key_value_heads": max(1, heads // 2), "intermediate_size": 4 * width,
        "tie_word_embeddings": config.architecture == "llama", **special,
    }  # fmt: skip
    cls = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config}
    return cls[config.architecture](**llama_like)


def init_model(config: TestbedConfig, vocab_size: int, eos_id: int) -> PreTrainedModel:
    """A randomly initialised causal LM of `config.architecture`, seeded without touching
    the caller's RNG. Llama ties its embeddings (as small Llamas do); the others do not,
    except GPT-2, whose LM head is always tied."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        return AutoModelForCausalLM.from_config(_hf_config(config, vocab_size, eos_id))


def next_token_loss(
    model: PreTrainedModel,
    inputs: torch.Tensor,
    labels: torch.Tensor,
    mask: torch.Tensor,
    *,
    labelled_only: bool = False,
) -> torch.Tensor:
    """Mean next-token cross-entropy over the labelled positions of (B, T) `inputs`,
    `labels` (-100: not predicted) and attention `mask`. With `labelled_only`, the LM head
    runs on those positions only instead of computing (B, T, V) logits everywhere (the
    same value to rounding)."""
    if not labelled_only:
        logits = model(inputs, attention_mask=mask).logits  # (B, T, V)
        return F.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]),
            labels[:, 1:].reshape(-1),
            ignore_index=-100,
        )
    hidden = model.base_model(inputs, attention_mask=mask).last_hidden_state  # (B, T, H)
    targets = labels[:, 1:]  # (B, T-1)
    scored = targets != -100
    logits = model.get_output_embeddings()(hidden[:, :-1][scored])  # (N, V)
    return F.cross_entropy(logits, targets[scored])


def train_model(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerFast,
    rows: PackedRows,
    rewrite: tuple[list[str], list[str]],
    config: TestbedConfig,
    *,
    progress: bool,
    checkpoint: TrainingCheckpoint | None = None,
) -> TrainRun:
    """AdamW with warm-up + linear decay on packed rows; stop at `target_recall`.

    Recall is checked on the first `config.recall_sample` rewrite prompts. With a
    `checkpoint`, a matching earlier state is resumed first and the state is saved at each
    recall check: a resumed run ends with the same weights as an uninterrupted one."""
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=config.lr, betas=(0.9, 0.98), weight_decay=config.weight_decay
    )
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _lr_factor(s, config))
    history: list[RecallPoint] = []
    losses: list[float] = []
    step, stopped_early, seconds_before = 0, False, 0.0
    resumed = checkpoint.resume(model, optimizer, schedule, rows) if checkpoint else None
    if resumed is not None:
        step, seconds_before, losses = resumed.step, resumed.seconds, list(resumed.losses)
        history = [RecallPoint.model_validate(point) for point in resumed.history]
    sample = tuple(part[: config.recall_sample] for part in rewrite)
    first_step = step + 1
    started = time.perf_counter() - seconds_before
    model.train()
    bar = tqdm(
        total=config.steps, initial=step, desc="testbed", unit="step", disable=not progress,
        mininterval=0.5,
    )  # fmt: skip
    for step in range(first_step, config.steps + 1):
        loss = next_token_loss(
            model, *rows.batch(config.batch_size), labelled_only=config.fast_training
        )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        bar.update(1)
        if step % config.eval_every == 0 or step == config.steps:
            recall = mean_or_none(first_token_hits(model, tokenizer, *sample)) or 0.0
            window = losses[-config.eval_every :]
            point = RecallPoint(
                step=step,
                loss=sum(window) / len(window),
                recall=recall,
                seconds=time.perf_counter() - started,
            )
            history.append(point)
            bar.set_postfix(loss=f"{point.loss:.3f}", recall=f"{recall:.3f}")
            log.info("testbed step %d: loss %.3f, recall %.3f", step, point.loss, recall)
            if config.target_recall is not None and recall >= config.target_recall:
                stopped_early = step < config.steps
                break
            if checkpoint is not None and step < config.steps:
                done = TrainingProgress(
                    step=step,
                    seconds=point.seconds,
                    losses=losses,
                    history=[p.model_dump() for p in history],
                )
                checkpoint.save(done, model, optimizer, schedule, rows)
    bar.close()
    window = losses[-config.eval_every :]
    return TrainRun(
        steps=step,
        stopped_early=stopped_early,
        final_loss=sum(window) / len(window),
        seconds=time.perf_counter() - started,
        history=history,
    )
