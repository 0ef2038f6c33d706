"""Context templates: short prefixes before the edit prompt, for key averaging and value loss.

Each template has one `{}` that is filled with the request prompt (whose own `{}` is then
filled with the subject). The first template is always the bare "{}". Templates are either
given (a fixed list) or sampled from the model itself, as the reference does: for each
(length, n) in `length_params`, n texts of `length` tokens in total, starting from the
model's begin-of-text token (GPT-2: `<|endoftext|>`), top-k sampling; each text becomes
"<text>. {}". Sampling draws from a seeded CPU `torch.Generator`, so a seed reproduces them.
"""

from __future__ import annotations

import logging
import unicodedata
from collections.abc import Sequence

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger(__name__)

BARE_TEMPLATE = "{}"


def _clean(text: str) -> str:
    """Reference post-processing (NFKD, blank lines to spaces) plus dropping braces."""
    text = unicodedata.normalize("NFKD", text).replace("\n\n", " ")
    return text.replace("{", "").replace("}", "")


def _start_token_id(tokenizer: PreTrainedTokenizerBase) -> int:
    for token_id in (tokenizer.bos_token_id, tokenizer.eos_token_id):
        if token_id is not None:
            return int(token_id)
    raise ValueError("tokenizer has neither a bos nor an eos token to start sampling from")


@torch.no_grad()
def sample_texts(
    model: PreTrainedModel,
    start_id: int,
    n: int,
    length: int,
    generator: torch.Generator,
    top_k: int = 5,
) -> torch.Tensor:
    """(n, max(length, 1)) token ids: `start_id` then top-k samples until `length` tokens."""
    device = next(model.parameters()).device
    ids = torch.full((n, 1), start_id, dtype=torch.long, device=device)
    while ids.shape[1] < length:
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[:, -1, :]
        probs = torch.softmax(logits.float(), dim=-1).cpu()  # (n, V)
        top_probs, top_ids = torch.topk(probs, min(top_k, probs.shape[-1]), dim=-1)
        top_probs = top_probs / top_probs.sum(dim=-1, keepdim=True)
        choice = torch.multinomial(top_probs, 1, generator=generator)  # (n, 1)
        ids = torch.cat([ids, torch.gather(top_ids, 1, choice).to(device)], dim=1)
    return ids


def generate_context_templates(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    length_params: Sequence[Sequence[int]],
    *,
    seed: int,
    top_k: int = 5,
) -> list[str]:
    """["{}", "<sampled text>. {}", ...] sampled from `model` with `seed`.

    Args:
        length_params: pairs (length, n): n texts of `length` tokens each, the start token
            included (reference semantics: [[5, 10], [10, 10]] gives 10 texts of 4 sampled
            tokens and 10 of 9).
        seed: seeds the CPU generator used for every sampling draw.
        top_k: sample among the k most likely next tokens.
    """
    generator = torch.Generator(device="cpu").manual_seed(seed)
    start_id = _start_token_id(tokenizer)
    templates = [BARE_TEMPLATE]
    for pair in length_params:
        if len(pair) != 2:
            raise ValueError(f"length params must be (length, n) pairs, got {list(pair)}")
        length, n = int(pair[0]), int(pair[1])
        ids = sample_texts(model, start_id, n, length, generator, top_k=top_k)
        for row in ids[:, 1:].tolist():
            text = _clean(tokenizer.decode(row, skip_special_tokens=True))
            templates.append(f"{text}. {{}}")
    log.info("sampled %d context templates (seed %d)", len(templates) - 1, seed)
    return templates


def normalize_templates(templates: Sequence[str]) -> list[str]:
    """A fixed template list, validated, with the bare "{}" first (moved or added)."""
    for template in templates:
        if template.count("{}") != 1:
            raise ValueError(f"context template must contain exactly one '{{}}': {template!r}")
    result = list(templates)
    if BARE_TEMPLATE in result:
        result.remove(BARE_TEMPLATE)
    return [BARE_TEMPLATE, *result]


def context_templates_for(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    *,
    fixed: Sequence[str] | None,
    length_params: Sequence[Sequence[int]],
    seed: int,
    top_k: int = 5,
) -> list[str]:
    """The fixed list when given, else templates sampled from the model with `seed`."""
    if fixed is not None:
        return normalize_templates(fixed)
    return generate_context_templates(model, tokenizer, length_params, seed=seed, top_k=top_k)
