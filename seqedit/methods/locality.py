"""How far an edited model's predictions have moved from the base model's.

For fixed probe prompts: the base model's next-token log-probabilities are taken once;
later, `locality_drift` compares the edited model's with them (mean KL(base || edited) and
the share of prompts whose top-1 next token is unchanged). `perplexity` scores held-out
text, a coarser signal of damage to the model's language as a whole.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from seqedit.methods.scoring import pad_id_of, padded_inputs


@torch.no_grad()
def next_token_log_probs(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    *,
    batch_size: int = 64,
) -> torch.Tensor:
    """(n, V) float32 log-probabilities of the token after each prompt (right padding,
    positions from the attention mask, read at each prompt's own last token)."""
    device = next(model.parameters()).device
    out = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        ids = [tokenizer.encode(p, add_special_tokens=False) for p in chunk]
        if any(not row for row in ids):
            raise ValueError("a probe prompt tokenises to nothing")
        inputs, _ = padded_inputs(ids, pad_id_of(tokenizer), device)
        logits = model(**inputs).logits.float()  # (B, T, V)
        last = torch.tensor([len(tokens) - 1 for tokens in ids], device=device)
        rows = torch.arange(len(ids), device=device)
        out.append(torch.log_softmax(logits[rows, last], dim=-1).cpu())
    return torch.cat(out)


@torch.no_grad()
def perplexity(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
    *,
    max_tokens: int = 128,
    batch_size: int = 16,
) -> float:
    """exp of the mean next-token NLL over every predicted token of `texts` (each cut to
    its first `max_tokens` tokens; a text of one token predicts nothing and is skipped)."""
    device = next(model.parameters()).device
    encoded = [tokenizer.encode(t, add_special_tokens=False)[:max_tokens] for t in texts]
    encoded = [ids for ids in encoded if len(ids) > 1]
    if not encoded:
        raise ValueError("no held-out text of two tokens or more to score")
    total, count = 0.0, 0
    for start in range(0, len(encoded), batch_size):
        ids = encoded[start : start + batch_size]
        inputs, _ = padded_inputs(ids, pad_id_of(tokenizer), device)
        logits = model(**inputs).logits.float()  # (B, T, V)
        log_probs = torch.log_softmax(logits[:, :-1], dim=-1)  # (B, T-1, V)
        for row, tokens in enumerate(ids):
            targets = torch.tensor(tokens[1:], device=device)  # (n-1,)
            picked = log_probs[row, : len(tokens) - 1].gather(1, targets[:, None])
            total -= float(picked.sum())
            count += len(tokens) - 1
    return math.exp(total / count)


class LocalityDrift(NamedTuple):
    """kl: mean KL(base || edited) in nats; top1: share of prompts with the same argmax."""

    kl: float
    top1: float


def locality_drift(base: torch.Tensor, edited: torch.Tensor) -> LocalityDrift:
    """Compare (n, V) log-probabilities of the base and the edited model."""
    if base.shape != edited.shape:
        raise ValueError(f"shapes differ: {tuple(base.shape)} vs {tuple(edited.shape)}")
    kl = (base.exp() * (base - edited)).sum(dim=-1)  # (n,)
    same = base.argmax(dim=-1) == edited.argmax(dim=-1)  # (n,)
    return LocalityDrift(kl=float(kl.mean()), top1=float(same.float().mean()))


class BaseMeasures:
    """The base model's side of the locality and perplexity checks, taken once.

    Args:
        model, tokenizer: the model before any edit.
        probes: prompts whose next-token distributions (n, V) are kept.
        heldout: texts whose perplexity is kept (none: no perplexity check).
    """

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        probes: Sequence[str] = (),
        heldout: Sequence[str] = (),
    ) -> None:
        self.probes, self.heldout = list(probes), list(heldout)
        self.probe_log_probs = next_token_log_probs(model, tokenizer, self.probes)
        self.perplexity = perplexity(model, tokenizer, self.heldout) if heldout else math.nan

    def compare(
        self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase
    ) -> dict[str, float]:
        """`locality_kl` and `locality_top1` on the probes, held-out `perplexity` and its
        `perplexity_ratio` to the base model's, for the model as it is now (each where its
        inputs were given)."""
        metrics: dict[str, float] = {}
        if self.probes:
            now = next_token_log_probs(model, tokenizer, self.probes)
            drift = locality_drift(self.probe_log_probs, now)
            metrics["locality_kl"], metrics["locality_top1"] = drift.kl, drift.top1
        if self.heldout:
            metrics["perplexity"] = perplexity(model, tokenizer, self.heldout)
            metrics["perplexity_ratio"] = metrics["perplexity"] / self.perplexity
        return metrics
