"""Free text generation for the generation metrics: batched top-k sampling with a KV cache.

The reference is ROME's `generate_fast` (kmeng01/rome, util/generate.py), called by the
CounterFact evaluation with `n_gen_per_prompt=1, max_out_len=100` and its default top_k=5.
It tokenizes with the tokenizer's own defaults, samples each next token among the k most
likely (probabilities renormalised over those k), decodes every row whole (prompt and
continuation) and cleans the text: NFKD normalisation, blank lines ("\\n\\n") to a space,
no special tokens. We do the same, except:

- Length. ROME's `max_out_len` counts every token of a row, the prompt's included, so a
  row of p prompt tokens gets 100 - p new ones. Here `max_new_tokens` counts new tokens
  only (default 100); `max_length` caps the total as well, so `max_length=100` reproduces
  ROME's lengths exactly (the default max_new_tokens=100 is then never the binding limit).
- EOS. ROME samples past an end-of-text token and deletes "<|endoftext|>" from the text;
  here a row stops at its first EOS (when the tokenizer has one), which is not decoded.
- Batching. ROME pads on the right and advances all rows in lockstep from the shortest
  prompt; here rows are padded on the left with position ids counted from the attention
  mask (`padded_inputs`). Both sample each row from the model's own distribution.
- Randomness. ROME draws from the global RNG; here every draw comes from an explicit
  `torch.Generator`, so a seed (with the same prompts and batch size) reproduces the texts.
  top_k=1 is greedy decoding (argmax, no draw, no generator needed).
"""

from __future__ import annotations

import unicodedata
from collections.abc import Sequence

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from seqedit.methods.scoring import pad_id_of, padded_inputs


def clean_generated(text: str) -> str:
    """ROME's post-processing of a generated text: NFKD normalisation, "\\n\\n" to " "."""
    return unicodedata.normalize("NFKD", text).replace("\n\n", " ")


def generate_texts(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    *,
    max_new_tokens: int = 100,
    top_k: int = 5,
    generator: torch.Generator | None,
    batch_size: int = 16,
    max_length: int | None = None,
) -> list[str]:
    """One generated text per prompt: the prompt and its continuation, decoded together
    without special tokens and cleaned as ROME does (`clean_generated`).

    Prompts are tokenized with the tokenizer's defaults (a Llama gets its BOS, GPT-2
    nothing), as ROME's `tok(prompts)` does. See `generate_token_ids` for the arguments.
    """
    encoded = tokenizer(list(prompts))["input_ids"] if prompts else []
    prompt_ids = [list(ids) for ids in encoded]
    for ids, prompt in zip(prompt_ids, prompts, strict=True):
        if not ids:
            raise ValueError(f"prompt {prompt!r} has no tokens")
    new_ids = generate_token_ids(
        model,
        prompt_ids,
        max_new_tokens=max_new_tokens,
        top_k=top_k,
        generator=generator,
        eos_id=tokenizer.eos_token_id,
        pad_id=pad_id_of(tokenizer),
        batch_size=batch_size,
        max_length=max_length,
    )
    return [
        clean_generated(tokenizer.decode(ids + new, skip_special_tokens=True))
        for ids, new in zip(prompt_ids, new_ids, strict=True)
    ]


def generate_token_ids(
    model: PreTrainedModel,
    prompt_ids: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    top_k: int,
    generator: torch.Generator | None,
    eos_id: int | None,
    pad_id: int,
    batch_size: int = 16,
    max_length: int | None = None,
) -> list[list[int]]:
    """The new token ids generated after each prompt (prompt ids not repeated).

    Args:
        prompt_ids: token ids of each prompt, none empty.
        max_new_tokens: new tokens per row, fewer where the row meets EOS or `max_length`.
        top_k: sample among the k most likely next tokens; 1 is greedy decoding.
        generator: source of every sampling draw (any device: probabilities move to it);
            required unless top_k == 1.
        eos_id: a row stops after generating this id (kept as its last new id); None: never.
        pad_id: id of padding positions (masked out).
        batch_size: rows per batch; prompts of similar length share a batch.
        max_length: when given, a row also stops at this many tokens, its prompt's included
            (ROME's `max_out_len`); a prompt already that long gets no new token.
    """
    if top_k < 1 or max_new_tokens < 0 or batch_size < 1:
        raise ValueError(f"need top_k >= 1, max_new_tokens >= 0, batch_size >= 1; got "
                         f"{top_k}, {max_new_tokens}, {batch_size}")  # fmt: skip
    if top_k > 1 and generator is None:
        raise ValueError("top-k sampling (top_k > 1) needs an explicit torch.Generator")
    if any(len(ids) == 0 for ids in prompt_ids):
        raise ValueError("every prompt needs at least one token")
    budgets = [
        max_new_tokens if max_length is None else min(max_new_tokens, max(0, max_length - len(ids)))
        for ids in prompt_ids
    ]
    limit = getattr(model.config, "max_position_embeddings", None)
    longest = max((len(ids) + b for ids, b in zip(prompt_ids, budgets, strict=True)), default=0)
    if limit is not None and longest > limit:
        raise ValueError(f"prompt + new tokens reach {longest} positions; the model has {limit}")
    order = sorted(range(len(prompt_ids)), key=lambda i: len(prompt_ids[i]))
    results: list[list[int]] = [[] for _ in prompt_ids]
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        rows = _generate_batch(
            model,
            [list(prompt_ids[i]) for i in chunk],
            [budgets[i] for i in chunk],
            top_k=top_k,
            generator=generator,
            eos_id=eos_id,
            pad_id=pad_id,
        )
        for index, row in zip(chunk, rows, strict=True):
            results[index] = row
    return results


@torch.no_grad()
def _generate_batch(
    model: PreTrainedModel,
    rows: list[list[int]],
    budgets: list[int],
    *,
    top_k: int,
    generator: torch.Generator | None,
    eos_id: int | None,
    pad_id: int,
) -> list[list[int]]:
    """New ids of each row of one left-padded batch, row i getting at most budgets[i]."""
    steps = max(budgets)
    if steps == 0:
        return [[] for _ in rows]
    device = next(model.parameters()).device
    step_inputs, _ = padded_inputs(rows, pad_id, device, padding_side="left")
    mask, positions = step_inputs["attention_mask"], step_inputs["position_ids"]  # (B, T)
    budget = torch.tensor(budgets, device=device)  # (B,)
    n_new = budget.clone()  # (B,) new tokens each row keeps
    done = budget == 0  # (B,)
    generated = torch.full((len(rows), steps), pad_id, dtype=torch.long, device=device)  # (B, S)
    past = None
    for step in range(steps):
        out = model(**step_inputs, past_key_values=past, use_cache=True, logits_to_keep=1)
        past = out.past_key_values
        token = _next_tokens(out.logits[:, -1, :], top_k, generator)  # (B,)
        generated[:, step] = token
        if eos_id is not None:
            stops = (token == eos_id) & ~done  # (B,)
            n_new = torch.where(stops, step + 1, n_new)
            done = done | stops
        done = done | (budget <= step + 1)
        if bool(done.all()):
            break
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)  # (B, T + step + 1)
        positions = positions[:, -1:] + 1  # (B, 1)
        step_inputs = {"input_ids": token[:, None], "attention_mask": mask,
                       "position_ids": positions}  # fmt: skip
    return [row[:n] for row, n in zip(generated.tolist(), n_new.tolist(), strict=True)]


def _next_tokens(
    logits: torch.Tensor, top_k: int, generator: torch.Generator | None
) -> torch.Tensor:
    """(B,) next ids from (B, V) logits: argmax when top_k == 1, else a draw from the
    softmax over the top_k logits (ROME's renormalised top-k probabilities)."""
    if top_k == 1:
        return logits.argmax(dim=-1)
    if generator is None:
        raise ValueError("top-k sampling (top_k > 1) needs an explicit torch.Generator")
    top_logits, top_ids = torch.topk(logits.float(), min(top_k, logits.shape[-1]), dim=-1)
    probs = torch.softmax(top_logits, dim=-1).to(generator.device)  # (B, k)
    choice = torch.multinomial(probs, 1, generator=generator).to(top_ids.device)  # (B, 1)
    return top_ids.gather(1, choice)[:, 0]
