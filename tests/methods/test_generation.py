"""Batched top-k generation with a KV cache: left padding changes nothing, seeds reproduce,
samples stay in the top k, rows stop at EOS or at their token budget."""

from __future__ import annotations

import copy
from typing import get_args

import pytest
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerFast

from seqedit.methods.generation import clean_generated, generate_texts, generate_token_ids
from seqedit.testbed.train import TestbedArchitecture, TestbedConfig, init_model
from tests.methods.tiny import tiny_gpt2, tiny_tokenizer

PROMPTS = [
    "The city lies in",
    "By profession, Dovana Ravensworth is a",
    "In",
    "Helka Tillman works for Kyrosoft. Kelvin Everly plays",
    "The city",
]
N_NEW = 12


@pytest.fixture(scope="module")
def tok() -> PreTrainedTokenizerFast:
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def gpt2(tok: PreTrainedTokenizerFast) -> PreTrainedModel:
    return tiny_gpt2(len(tok))


def _model(arch: str, vocab_size: int) -> PreTrainedModel:
    config = TestbedConfig(architecture=arch, n_layer=3, n_embd=32, n_head=4)
    return init_model(config, vocab_size, eos_id=0).eval()


def _prompt_ids(tok: PreTrainedTokenizerFast) -> list[list[int]]:
    return [list(ids) for ids in tok(PROMPTS)["input_ids"]]


@torch.no_grad()
def _greedy_without_cache(model: PreTrainedModel, ids: list[int], n: int, eos: int) -> list[int]:
    """Oracle: one unpadded row, the whole sequence re-run at every step, argmax."""
    new: list[int] = []
    while len(new) < n and (not new or new[-1] != eos):
        logits = model(input_ids=torch.tensor([ids + new])).logits  # (1, T, V)
        new.append(int(logits[0, -1].argmax()))
    return new


def _generate(model: PreTrainedModel, prompt_ids: list[list[int]], **kwargs) -> list[list[int]]:
    options = {"max_new_tokens": N_NEW, "top_k": 1, "generator": None, "eos_id": 0,
               "pad_id": 0, "batch_size": 8, **kwargs}  # fmt: skip
    return generate_token_ids(model, prompt_ids, **options)


@pytest.mark.parametrize("arch", list(get_args(TestbedArchitecture)))
def test_greedy_left_padded_batch_equals_one_at_a_time(
    tok: PreTrainedTokenizerFast, arch: str
) -> None:
    model = _model(arch, len(tok))
    prompt_ids = _prompt_ids(tok)
    assert len({len(ids) for ids in prompt_ids}) == len(PROMPTS)  # all lengths differ
    batched = _generate(model, prompt_ids)
    single = _generate(model, prompt_ids, batch_size=1)
    assert batched == single
    for ids, new in zip(prompt_ids, batched, strict=True):
        assert new == _greedy_without_cache(model, ids, N_NEW, eos=0)


def test_same_generator_seed_same_samples(gpt2: PreTrainedModel, tok) -> None:
    def sample(seed: int) -> list[str]:
        generator = torch.Generator().manual_seed(seed)
        return generate_texts(gpt2, tok, PROMPTS, max_new_tokens=N_NEW, generator=generator)

    first = sample(0)
    assert sample(0) == first
    assert sample(1) != first
    assert all(text.startswith(prompt) for prompt, text in zip(PROMPTS, first, strict=True))


@torch.no_grad()
def test_samples_are_among_the_top_k(gpt2: PreTrainedModel, tok) -> None:
    prompt_ids = _prompt_ids(tok)
    generator = torch.Generator().manual_seed(0)
    new_ids = _generate(gpt2, prompt_ids, top_k=3, generator=generator, eos_id=None)
    for ids, new in zip(prompt_ids, new_ids, strict=True):
        logits = gpt2(input_ids=torch.tensor([ids + new])).logits[0]  # (T, V)
        top3 = torch.topk(logits[len(ids) - 1 : -1], 3, dim=-1).indices  # (N_NEW, 3)
        assert all(token in row for token, row in zip(new, top3.tolist(), strict=True))
    assert any(new != greedy for new, greedy in zip(new_ids, _generate(gpt2, prompt_ids),
                                                    strict=True))  # fmt: skip


def test_exactly_max_new_tokens_without_eos(gpt2: PreTrainedModel, tok) -> None:
    prompt_ids = _prompt_ids(tok)
    generator = torch.Generator().manual_seed(0)
    new_ids = _generate(gpt2, prompt_ids, top_k=5, generator=generator, eos_id=None)
    assert [len(new) for new in new_ids] == [N_NEW] * len(PROMPTS)
    assert any(0 in new for new in new_ids)  # EOS (id 0) was sampled and did not stop a row


def test_texts_decode_prompt_and_continuation(gpt2: PreTrainedModel, tok) -> None:
    prompt_ids = _prompt_ids(tok)
    no_eos = copy.deepcopy(tok)
    no_eos.eos_token = None
    assert no_eos.eos_token_id is None
    texts = generate_texts(gpt2, no_eos, PROMPTS, max_new_tokens=N_NEW,
                           generator=torch.Generator().manual_seed(3))  # fmt: skip
    new_ids = _generate(gpt2, prompt_ids, top_k=5, generator=torch.Generator().manual_seed(3),
                        eos_id=None, batch_size=16)  # fmt: skip
    for ids, new, text, prompt in zip(prompt_ids, new_ids, texts, PROMPTS, strict=True):
        assert text == clean_generated(tok.decode(ids + new, skip_special_tokens=True))
        assert text.startswith(prompt)
    assert clean_generated("a\n\nb\u00e9\u2026") == "a be\u0301..."  # ROME's cleaning


def test_a_row_stops_at_its_first_eos(gpt2: PreTrainedModel, tok) -> None:
    prompt_ids = _prompt_ids(tok)
    free = _generate(gpt2, prompt_ids, eos_id=None)
    row = free[1]
    step = next(i for i in range(2, N_NEW) if row[i] not in row[:i])  # first occurrence
    stopped = _generate(gpt2, prompt_ids, eos_id=row[step])
    assert stopped[1] == row[: step + 1]
    for new, full in zip(stopped, free, strict=True):
        assert new == (full[: full.index(row[step]) + 1] if row[step] in full else full)


def test_max_length_counts_the_prompt(gpt2: PreTrainedModel, tok) -> None:
    prompt_ids = _prompt_ids(tok)
    max_length = 10
    new_ids = _generate(gpt2, prompt_ids, eos_id=None, max_new_tokens=100,
                        max_length=max_length)  # fmt: skip
    assert [len(ids) + len(new) for ids, new in zip(prompt_ids, new_ids, strict=True)] == [
        max(max_length, len(ids)) for ids in prompt_ids
    ]
    assert any(len(ids) > max_length for ids in prompt_ids)  # that row got no new token
    unbounded = _generate(gpt2, prompt_ids, eos_id=None)
    for new, full in zip(new_ids, unbounded, strict=True):
        assert new == full[: len(new)]


def test_invalid_requests_are_refused(gpt2: PreTrainedModel, tok) -> None:
    prompt_ids = _prompt_ids(tok)
    with pytest.raises(ValueError, match="Generator"):
        _generate(gpt2, prompt_ids, top_k=5, generator=None)
    with pytest.raises(ValueError, match="positions"):
        _generate(gpt2, prompt_ids, max_new_tokens=100)  # the tiny GPT-2 has 64 positions
    with pytest.raises(ValueError, match="no tokens"):
        generate_texts(gpt2, tok, [""], generator=None, top_k=1)
