"""Losses of the adapter methods (LoRA SFT and DPO) on prompt + completion rows.

A batch is (B, T) token ids with (B, T) labels: -100 on prompt and padding positions, the
token id on completion positions. Teacher forcing: the logits at position t predict the
label at t + 1.

  sft_loss   = mean over every completion token of the batch of -log p(token | prefix)
  dpo_loss   = alpha * NLL(chosen) + (1 - alpha) * mean_b -log sigmoid(beta * margin_b)
  margin_b   = (log pi(chosen_b) - log ref(chosen_b)) - (log pi(rejected_b) - log ref(rejected_b))

where log pi(y) sums the log-probabilities of y's completion tokens (`completion_logprobs`)
and ref is the model before the edit. With alpha = 1 DPO is SFT on the chosen completion.
EasyEdit's DPO differs on purpose in two places: it sums log-softmax over the vocabulary
axis instead of picking each completion token, and it passes the margin through tanh.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE = -100


def completion_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(B,) sum of log p(label_{t+1} | tokens_{<=t}) over the completion positions of
    (B, T, V) `logits` and (B, T) `labels`."""
    targets = labels[:, 1:]  # (B, T-1)
    scored = targets != IGNORE
    logp = logits[:, :-1].float().log_softmax(-1)  # (B, T-1, V)
    picked = logp.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)  # (B, T-1)
    return (picked * scored).sum(-1)


def sft_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean negative log-likelihood over every completion token of the batch (the loss a
    Hugging Face causal LM returns for these labels)."""
    n_tokens = (labels[:, 1:] != IGNORE).sum()
    if n_tokens == 0:
        raise ValueError("no completion tokens to score: every label is -100")
    return -completion_logprobs(logits, labels).sum() / n_tokens


def dpo_loss(
    nll_chosen: torch.Tensor,
    policy: tuple[torch.Tensor, torch.Tensor],
    reference: tuple[torch.Tensor, torch.Tensor],
    *,
    alpha: float,
    beta: float,
) -> torch.Tensor:
    """alpha * `nll_chosen` + (1 - alpha) * the DPO term.

    Args:
        nll_chosen: scalar `sft_loss` of the chosen completions under the policy.
        policy: (B,) `completion_logprobs` of (chosen, rejected) under the edited model.
        reference: the same under the model before the edit (no gradient needed).
        alpha: weight of the NLL term in [0, 1]; beta: DPO temperature (> 0).
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    (chosen, rejected), (ref_chosen, ref_rejected) = policy, reference
    margin = beta * ((chosen - ref_chosen) - (rejected - ref_rejected))  # (B,)
    preference = -F.logsigmoid(margin).mean()
    return alpha * nll_chosen + (1.0 - alpha) * preference
