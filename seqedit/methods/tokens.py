"""Subject token positions, computed from the tokenization of each filled template.

A template has exactly one `{}` where the subject goes. The lookup position of a fact is
the subject's LAST token ("subject_last"), its first ("subject_first"), the token after it
("subject_first_after_last", falling back to the last subject token at the end of the
text), or the last token of the text ("last"). Positions are first found in the unpadded
tokenization of each text, then shifted by the padding of the batch when padding is on
the left.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from transformers import PreTrainedTokenizerBase

FactToken = Literal["subject_last", "subject_first", "subject_first_after_last", "last"]


def fill(template: str, subject: str) -> str:
    """`template` with its single `{}` replaced by `subject` (no other `format` semantics)."""
    if template.count("{}") != 1:
        raise ValueError(f"template must contain exactly one '{{}}': {template!r}")
    return template.replace("{}", subject)


def _span_index_from_offsets(
    offsets: Sequence[tuple[int, int]], start: int, end: int, n_tokens: int, fact_token: FactToken
) -> int:
    overlapping = [i for i, (a, b) in enumerate(offsets) if b > a and a < end and b > start]
    if not overlapping:
        raise ValueError(f"no token overlaps the subject span [{start}, {end})")
    if fact_token == "subject_first":
        return overlapping[0]
    last = overlapping[-1]
    if fact_token == "subject_first_after_last" and last + 1 < n_tokens:
        return last + 1
    return last


def _span_index_by_pieces(
    tokenizer: PreTrainedTokenizerBase, template: str, subject: str, fact_token: FactToken
) -> int:
    """Slow-tokenizer fallback: tokenize prefix, subject and suffix separately (reference way)."""
    cut = template.index("{}")
    prefix, suffix = template[:cut], template[cut + 2 :]
    word = subject
    if prefix.endswith(" "):  # the space belongs to the subject's first BPE token
        prefix, word = prefix[:-1], " " + subject.strip()
    n_prefix = len(tokenizer(prefix, add_special_tokens=True)["input_ids"])
    n_word = len(tokenizer(word, add_special_tokens=False)["input_ids"])
    n_suffix = len(tokenizer(suffix, add_special_tokens=False)["input_ids"])
    if fact_token == "subject_first":
        return n_prefix
    if fact_token == "subject_first_after_last" and n_suffix > 0:
        return n_prefix + n_word
    return n_prefix + n_word - 1


def subject_index(
    tokenizer: PreTrainedTokenizerBase, template: str, subject: str, fact_token: FactToken
) -> int:
    """Index of the lookup token in the UNPADDED tokenization of `fill(template, subject)`.

    Uses the character offsets of a fast tokenizer (any token overlapping the subject's
    characters belongs to the subject); falls back to piecewise tokenization otherwise.
    """
    text = fill(template, subject)
    if fact_token == "last":
        return len(tokenizer(text)["input_ids"]) - 1
    if not subject:
        raise ValueError("subject is empty")
    if not getattr(tokenizer, "is_fast", False):
        return _span_index_by_pieces(tokenizer, template, subject, fact_token)
    encoding = tokenizer(text, return_offsets_mapping=True)
    start = template.index("{}")
    return _span_index_from_offsets(
        encoding["offset_mapping"],
        start,
        start + len(subject),
        len(encoding["input_ids"]),
        fact_token,
    )


def subject_indices(
    tokenizer: PreTrainedTokenizerBase,
    templates: Sequence[str],
    subjects: Sequence[str],
    fact_token: FactToken,
) -> list[int]:
    """`subject_index` for each (template, subject) pair (unpadded positions)."""
    if len(templates) != len(subjects):
        raise ValueError(f"{len(templates)} templates but {len(subjects)} subjects")
    return [
        subject_index(tokenizer, t, s, fact_token) for t, s in zip(templates, subjects, strict=True)
    ]


def padded_positions(
    indices: Sequence[int], attention_mask: torch.Tensor, padding_side: str
) -> list[int]:
    """Map unpadded token indices into a padded batch.

    Args:
        indices: one unpadded index per row.
        attention_mask: (B, T) mask of the padded batch (1 = real token).
        padding_side: "left" shifts each index by that row's number of pads; "right" keeps it.
    """
    lengths = attention_mask.sum(dim=1).tolist()
    width = attention_mask.shape[1]
    if padding_side == "left":
        return [int(i + width - n) for i, n in zip(indices, lengths, strict=True)]
    if padding_side == "right":
        return [int(i) for i in indices]
    raise ValueError(f"unknown padding side {padding_side!r}")


def encode_batch(
    tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], device: torch.device
) -> dict[str, torch.Tensor]:
    """Tokenize `texts` with padding into model inputs on `device`.

    Returns input_ids and attention_mask (B, T); with left padding also position_ids
    counted from each row's first real token, so padded rows see the positions an
    unpadded forward would.
    """
    batch = tokenizer(list(texts), padding=True, return_tensors="pt")
    return _model_inputs(batch["input_ids"], batch["attention_mask"], device)


def _model_inputs(
    input_ids: torch.Tensor, attention_mask: torch.Tensor, device: torch.device
) -> dict[str, torch.Tensor]:
    """input_ids and attention_mask (B, T) on `device`, with position_ids when some row is
    left-padded."""
    inputs = {"input_ids": input_ids.to(device), "attention_mask": attention_mask.to(device)}
    mask = inputs["attention_mask"]
    if bool((mask[:, 0] == 0).any()):  # some row is left-padded
        inputs["position_ids"] = (mask.long().cumsum(dim=1) - 1).clamp_min(0)
    return inputs


def batch_subject_positions(
    tokenizer: PreTrainedTokenizerBase,
    templates: Sequence[str],
    subjects: Sequence[str],
    fact_token: FactToken,
    attention_mask: torch.Tensor,
) -> list[int]:
    """Lookup positions of each row in a padded batch of `fill(template, subject)` texts."""
    indices = subject_indices(tokenizer, templates, subjects, fact_token)
    return padded_positions(indices, attention_mask, tokenizer.padding_side)


def encode_at_subjects(
    tokenizer: PreTrainedTokenizerBase,
    templates: Sequence[str],
    subjects: Sequence[str],
    fact_token: FactToken,
    device: torch.device,
) -> tuple[dict[str, torch.Tensor], list[int]]:
    """`encode_batch` of the filled templates and `batch_subject_positions` in it.

    A fast tokenizer does both in one call (the padded batch with character offsets), a
    slow one as the two functions do. The tokens and positions are the same either way.
    """
    if len(templates) != len(subjects):
        raise ValueError(f"{len(templates)} templates but {len(subjects)} subjects")
    texts = [fill(t, s) for t, s in zip(templates, subjects, strict=True)]
    if not getattr(tokenizer, "is_fast", False):
        inputs = encode_batch(tokenizer, texts, device)
        mask = inputs["attention_mask"]
        return inputs, batch_subject_positions(tokenizer, templates, subjects, fact_token, mask)
    batch = tokenizer(texts, padding=True, return_offsets_mapping=True)
    ids = torch.tensor(batch["input_ids"], dtype=torch.long)
    mask = torch.tensor(batch["attention_mask"], dtype=torch.long)
    indices = []
    for row, (template, subject) in enumerate(zip(templates, subjects, strict=True)):
        real = [o for o, m in zip(batch["offset_mapping"][row], batch["attention_mask"][row],
                                  strict=True) if m]  # fmt: skip
        if fact_token == "last":
            indices.append(len(real) - 1)
            continue
        if not subject:
            raise ValueError("subject is empty")
        start = template.index("{}")
        indices.append(
            _span_index_from_offsets(real, start, start + len(subject), len(real), fact_token)
        )
    positions = padded_positions(indices, mask, tokenizer.padding_side)
    return _model_inputs(ids, mask, device), positions


def last_token_positions(attention_mask: torch.Tensor, n: int) -> torch.Tensor:
    """(B, n) positions of the last `n` real tokens of each row of a padded batch."""
    rows = []
    for mask_row in attention_mask:
        real = torch.nonzero(mask_row, as_tuple=False).squeeze(1)
        if real.numel() < n:
            raise ValueError(f"row has {real.numel()} real tokens, fewer than {n}")
        rows.append(real[-n:])
    return torch.stack(rows)


class EncodingMemo:
    """`encode_at_subjects` results reused by later passes over the same rows.

    Made for one edit (MEMIT/AlphaEdit read each layer's keys from the same texts), not kept
    across edits.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, device: torch.device) -> None:
        self._tokenizer = tokenizer
        self._device = device
        self._memo: dict[tuple, tuple[dict[str, torch.Tensor], list[int]]] = {}

    def __call__(
        self, templates: Sequence[str], subjects: Sequence[str], fact_token: FactToken
    ) -> tuple[dict[str, torch.Tensor], list[int]]:
        key = (tuple(templates), tuple(subjects), fact_token)
        if key not in self._memo:
            self._memo[key] = encode_at_subjects(
                self._tokenizer, templates, subjects, fact_token, self._device
            )
        return self._memo[key]
