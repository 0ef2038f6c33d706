"""Teacher-forced scoring: batched equals one-at-a-time, with left and right padding."""

from __future__ import annotations

import math

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

from seqedit.methods.scoring import pack_rows, score_targets


@pytest.fixture(scope="module")
def tiny() -> tuple[GPT2LMHeadModel, PreTrainedTokenizerFast]:
    words = ["<|endoftext|>", *"a b c d e f g h the was born in Paris Rome cat".split()]
    vocab = {w: i for i, w in enumerate(words)}
    raw = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<|endoftext|>"))
    raw.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="<|endoftext|>")
    tok.pad_token = tok.eos_token
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(vocab), n_layer=2, n_embd=32, n_head=2))
    return model.eval(), tok


PROMPTS = [
    "a b c the",
    "the cat was born in",
    "h",
    "d e f g h a b",
    "the cat was born in",
    "the cat was born in",
    "h",
    "the cat was born in",
]
TARGETS = ["Paris", "Rome Paris", "cat a b", "e", "Rome", "Paris", "cat a", "Rome Rome"]
"""Prompts repeat with targets that share rows (Rome under Rome Paris, cat a under cat a b)
and targets that cannot (Paris, Rome Rome), so packed rows are exercised."""


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_batched_equals_one_at_a_time(tiny, padding_side: str) -> None:
    model, tok = tiny
    batched = score_targets(model, tok, PROMPTS, TARGETS, batch_size=4, padding_side=padding_side)
    single = [
        score_targets(model, tok, [p], [t], batch_size=1)[0]
        for p, t in zip(PROMPTS, TARGETS, strict=True)
    ]
    for b, s in zip(batched, single, strict=True):
        assert b.mean_nll == pytest.approx(s.mean_nll, abs=1e-5)
        assert b.prob == pytest.approx(s.prob, abs=1e-5)
        assert b.first_token_prob == pytest.approx(s.first_token_prob, abs=1e-5)
        assert b.token_accuracy == s.token_accuracy and b.n_tokens == s.n_tokens
        assert b.predicted == s.predicted


def test_pack_rows_shares_a_row_only_where_the_tokens_match() -> None:
    pairs = [([1, 2], [7]), ([1, 2], [5, 6, 7]), ([1, 2], [5, 6]), ([1, 2], [8, 9]), ([3], [7])]
    rows, row_of = pack_rows(pairs)
    assert rows == [[1, 2, 5, 6], [1, 2, 8], [3]]
    # [7] needs only the prompt; [5, 6] needs 1 2 5: both ride on the 5 6 7 row
    assert row_of == [0, 0, 0, 1, 2]


def test_matches_hand_computed_nll(tiny) -> None:
    model, tok = tiny
    prompt_ids = tok("the cat was born in", add_special_tokens=False)["input_ids"]
    target_ids = tok(" Rome Paris", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logits = model(torch.tensor([prompt_ids + target_ids])).logits[0]
    log_probs = torch.log_softmax(logits, -1)
    expected = -sum(
        float(log_probs[len(prompt_ids) - 1 + j, t]) for j, t in enumerate(target_ids)
    ) / len(target_ids)
    (score,) = score_targets(model, tok, ["the cat was born in"], ["Rome Paris"])
    assert score.mean_nll == pytest.approx(expected, abs=1e-5)
    assert score.prob == pytest.approx(math.exp(-expected), rel=1e-5)
    assert score.n_tokens == 2
    predicted = log_probs[len(prompt_ids) - 1 : len(prompt_ids) + 1].argmax(-1).tolist()
    assert score.predicted == tuple(predicted)
    hits = sum(p == t for p, t in zip(predicted, target_ids, strict=True))
    assert score.token_accuracy == hits / 2
