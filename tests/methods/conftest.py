"""Fixtures the method tests share: the tiny tokenizer, and one torch thread for tests whose
tiny models run faster (and as reproducibly) on one."""

from __future__ import annotations

import pytest
import torch
from transformers import PreTrainedTokenizerFast

from tests.methods.tiny import tiny_tokenizer


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def one_thread() -> None:
    torch.set_num_threads(1)
