"""Teacher-forced scoring of target continuations, batched with padding.

Every metric of the project (efficacy, paraphrase, neighbourhood, token accuracy) is built
from one primitive: for a (prompt, target) pair, the log-probabilities the model assigns to
the target's tokens when they are fed after the prompt (teacher forcing). Prompt and target
are tokenised separately and concatenated, as the reference code does, so the target's
token boundaries never depend on the prompt.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from seqedit.schemas.requests import spaced


@dataclass(frozen=True)
class TargetScore:
    """Score of one target after one prompt.

    mean_nll: mean negative log-likelihood per target token (nats).
    prob: exp(-mean_nll), the per-token geometric-mean probability used by CounterFact ES/EM.
    first_token_prob: probability of the target's first token alone.
    token_accuracy: fraction of target tokens that are the argmax at their position.
    n_tokens: number of target tokens.
    """

    mean_nll: float
    prob: float
    first_token_prob: float
    token_accuracy: float
    n_tokens: int


def _encode(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def score_targets(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    targets: Sequence[str],
    *,
    batch_size: int = 64,
    padding_side: str = "right",
) -> list[TargetScore]:
    """Score `targets[i]` after `prompts[i]` for every i, `batch_size` pairs per forward pass.

    Targets get a leading space (`spaced`). Padding on either side gives the same scores:
    position ids are computed from the attention mask, and pad positions are masked out.
    """
    if len(prompts) != len(targets):
        raise ValueError(f"{len(prompts)} prompts but {len(targets)} targets")
    encoded = []
    for prompt, target in zip(prompts, targets, strict=True):
        prompt_ids = _encode(tokenizer, prompt)
        target_ids = _encode(tokenizer, spaced(target))
        if not prompt_ids or not target_ids:
            raise ValueError(f"empty tokenisation for prompt {prompt!r} / target {target!r}")
        encoded.append((prompt_ids, target_ids))
    # Sort by length so each batch pads little; scatter results back to input order.
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i][0]) + len(encoded[i][1]))
    results: list[TargetScore | None] = [None] * len(encoded)
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        scores = _score_batch(model, [encoded[i] for i in chunk], pad_id, padding_side, device)
        for index, score in zip(chunk, scores, strict=True):
            results[index] = score
    return [r for r in results if r is not None]


@torch.no_grad()
def _score_batch(
    model: PreTrainedModel,
    pairs: list[tuple[list[int], list[int]]],
    pad_id: int,
    padding_side: str,
    device: torch.device,
) -> list[TargetScore]:
    lengths = [len(p) + len(t) for p, t in pairs]
    width = max(lengths)
    input_ids = torch.full((len(pairs), width), pad_id, dtype=torch.long)  # (B, T)
    mask = torch.zeros((len(pairs), width), dtype=torch.long)  # (B, T)
    offsets = []
    for row, ((prompt_ids, target_ids), length) in enumerate(zip(pairs, lengths, strict=True)):
        offset = width - length if padding_side == "left" else 0
        input_ids[row, offset : offset + length] = torch.tensor(prompt_ids + target_ids)
        mask[row, offset : offset + length] = 1
        offsets.append(offset)
    position_ids = (mask.cumsum(dim=1) - 1).clamp(min=0)  # (B, T)
    logits = model(
        input_ids=input_ids.to(device),
        attention_mask=mask.to(device),
        position_ids=position_ids.to(device),
    ).logits.float()  # (B, T, V)
    log_probs = torch.log_softmax(logits, dim=-1)
    scores = []
    for row, (prompt_ids, target_ids) in enumerate(pairs):
        first = offsets[row] + len(prompt_ids) - 1  # logits here predict target token 0
        positions = torch.arange(first, first + len(target_ids), device=device)
        targets = torch.tensor(target_ids, device=device)
        token_log_probs = log_probs[row, positions, targets]  # (n_target,)
        argmax = log_probs[row, positions].argmax(dim=-1)  # (n_target,)
        mean_nll = float(-token_log_probs.mean())
        scores.append(
            TargetScore(
                mean_nll=mean_nll,
                prob=float(torch.exp(torch.tensor(-mean_nll))),
                first_token_prob=float(token_log_probs[0].exp()),
                token_accuracy=float((argmax == targets).float().mean()),
                n_tokens=len(target_ids),
            )
        )
    return scores
