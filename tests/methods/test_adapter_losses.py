"""The adapter losses equal hand computations on a fixed tiny case."""

from __future__ import annotations

import math

import pytest
import torch

from seqedit.methods.adapter_losses import completion_logprobs, dpo_loss, sft_loss

# One row of 4 tokens over a 3-token vocabulary: a 2-token prompt, a 2-token completion.
LOGITS = torch.tensor([[[0.0, 0.0, 0.0], [1.0, 2.0, 0.0], [0.0, 0.0, 3.0], [5.0, 5.0, 5.0]]])
LABELS = torch.tensor([[-100, -100, 1, 2]])  # completion tokens 1 then 2


def log_softmax_at(row: list[float], index: int) -> float:
    return row[index] - math.log(sum(math.exp(v) for v in row))


def test_completion_logprobs_and_sft_loss_by_hand() -> None:
    # position 1 predicts token 1, position 2 predicts token 2; position 3 predicts nothing
    by_hand = log_softmax_at([1.0, 2.0, 0.0], 1) + log_softmax_at([0.0, 0.0, 3.0], 2)
    assert completion_logprobs(LOGITS, LABELS).item() == pytest.approx(by_hand, abs=1e-6)
    assert sft_loss(LOGITS, LABELS).item() == pytest.approx(-by_hand / 2, abs=1e-6)


def test_sft_loss_is_the_hugging_face_loss() -> None:
    torch.manual_seed(0)
    logits = torch.randn(3, 6, 11)
    labels = torch.randint(11, (3, 6))
    labels[:, :2] = -100
    labels[1, 4:] = -100
    expected = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, 11), labels[:, 1:].reshape(-1), ignore_index=-100
    )
    torch.testing.assert_close(sft_loss(logits, labels), expected)


def test_dpo_loss_by_hand_and_alpha_one_is_sft() -> None:
    nll = torch.tensor(2.0)
    policy = (torch.tensor([-1.0, -2.0]), torch.tensor([-3.0, -1.0]))
    reference = (torch.tensor([-2.0, -2.0]), torch.tensor([-2.0, -2.0]))
    margins = [0.1 * ((-1 + 2) - (-3 + 2)), 0.1 * ((-2 + 2) - (-1 + 2))]  # 0.2, -0.1
    preference = sum(math.log(1 + math.exp(-m)) for m in margins) / 2
    loss = dpo_loss(nll, policy, reference, alpha=0.99, beta=0.1)
    assert loss.item() == pytest.approx(0.99 * 2.0 + 0.01 * preference, abs=1e-6)
    assert dpo_loss(nll, policy, reference, alpha=1.0, beta=0.1).item() == 2.0


def test_bad_arguments_are_named() -> None:
    with pytest.raises(ValueError, match="alpha"):
        dpo_loss(torch.tensor(0.0), (LOGITS, LOGITS), (LOGITS, LOGITS), alpha=1.5, beta=0.1)
    with pytest.raises(ValueError, match="beta"):
        dpo_loss(torch.tensor(0.0), (LOGITS, LOGITS), (LOGITS, LOGITS), alpha=0.5, beta=0.0)
    with pytest.raises(ValueError, match="no completion tokens"):
        sft_loss(LOGITS, torch.full_like(LABELS, -100))
