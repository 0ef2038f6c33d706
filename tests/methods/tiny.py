"""A tiny byte-level BPE tokenizer and random GPT-2 for method tests (no download, ~1 s)."""

from __future__ import annotations

import torch
from tokenizers import ByteLevelBPETokenizer
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

from seqedit.schemas.requests import EditRequest

CORPUS = [
    "The city lies in the north. Fenna Underhill was born in Corvale.",
    "Helka Tillman works for Kyrosoft. Kelvin Everly plays the harp.",
    "By profession, Dovana Ravensworth is a lawyer. In the evenings, people read.",
]
EOS = "<|endoftext|>"

BORN_IN = EditRequest(
    case_id=0,
    prompt="{} was born in",
    subject="Fenna Underhill",
    target_new="Kyrosoft",
    target_true="Corvale",
)
"""A request in CORPUS's words (its subject and both targets are known to the tokenizer)."""


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """BPE over CORPUS (320 tokens at most); EOS is id 0 and serves as bos, eos and pad."""
    bpe = ByteLevelBPETokenizer(add_prefix_space=False)
    bpe.train_from_iterator(CORPUS * 4, vocab_size=320, min_frequency=1, special_tokens=[EOS])
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe._tokenizer, bos_token=EOS, eos_token=EOS, pad_token=EOS
    )


def tiny_gpt2(vocab_size: int, n_layer: int = 2) -> GPT2LMHeadModel:
    """A frozen, eval-mode GPT-2 (width 32, 2 heads), initialised with torch seed 0."""
    torch.manual_seed(0)
    config = GPT2Config(
        n_layer=n_layer,
        n_embd=32,
        n_head=2,
        n_positions=64,
        vocab_size=vocab_size,
        bos_token_id=0,
        eos_token_id=0,
    )
    net = GPT2LMHeadModel(config).eval()
    for param in net.parameters():
        param.requires_grad_(False)
    return net
