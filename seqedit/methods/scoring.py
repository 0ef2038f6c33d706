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

from seqedit.methods.hooks import outputs_hooked
from seqedit.schemas.requests import spaced


@dataclass(frozen=True)
class TargetScore:
    """Score of one target after one prompt.

    mean_nll: mean negative log-likelihood per target token (nats).
    prob: exp(-mean_nll), the per-token geometric-mean probability used by CounterFact ES/EM.
    first_token_prob: probability of the target's first token alone.
    token_accuracy: fraction of target tokens that are the argmax at their position.
    n_tokens: number of target tokens.
    predicted: the argmax token id at each target position (teacher-forced), n_tokens ids.
    """

    mean_nll: float
    prob: float
    first_token_prob: float
    token_accuracy: float
    n_tokens: int
    predicted: tuple[int, ...] = ()


def _encode_all(tokenizer: PreTrainedTokenizerBase, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of each text (no special tokens), each distinct text encoded once."""
    unique = list(dict.fromkeys(texts))
    ids = tokenizer(unique, add_special_tokens=False)["input_ids"] if unique else []
    by_text = dict(zip(unique, ids, strict=True))
    return [list(by_text[t]) for t in texts]


def pad_id_of(tokenizer: PreTrainedTokenizerBase) -> int:
    """The id padding positions hold (masked out, so any id does; 0 without a pad token)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0


def padded_inputs(
    rows: Sequence[Sequence[int]], pad_id: int, device: torch.device, padding_side: str = "right"
) -> tuple[dict[str, torch.Tensor], list[int]]:
    """Model inputs for token rows of different lengths (`input_ids`, `attention_mask`,
    `position_ids`, each (B, T), positions counted from the mask so either padding side
    gives the same logits), and where each row starts (its left-padding width)."""
    width = max(len(row) for row in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)  # (B, T)
    mask = torch.zeros((len(rows), width), dtype=torch.long)  # (B, T)
    offsets = []
    for index, row in enumerate(rows):
        offset = width - len(row) if padding_side == "left" else 0
        input_ids[index, offset : offset + len(row)] = torch.tensor(row)
        mask[index, offset : offset + len(row)] = 1
        offsets.append(offset)
    position_ids = (mask.cumsum(dim=1) - 1).clamp(min=0)  # (B, T)
    inputs = {"input_ids": input_ids, "attention_mask": mask, "position_ids": position_ids}
    return {name: tensor.to(device) for name, tensor in inputs.items()}, offsets


def score_targets(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    targets: Sequence[str],
    *,
    batch_size: int = 64,
    padding_side: str = "right",
) -> list[TargetScore]:
    """Score `targets[i]` after `prompts[i]` for every i, `batch_size` rows per forward pass.

    Targets get a leading space (`spaced`). Padding on either side gives the same scores:
    position ids are computed from the attention mask, and pad positions are masked out.
    Pairs share rows where the model is causal enough to allow it (`pack_rows`): the
    target of one pair rides on the row of another with the same prompt whose tokens it
    needs, so a prompt scored against target_new and a one-token target_true costs one
    row, not two. The output head runs only at the positions that predict target tokens
    (the families we edit apply a plain head after the base model's final norm).
    """
    if len(prompts) != len(targets):
        raise ValueError(f"{len(prompts)} prompts but {len(targets)} targets")
    prompt_ids = _encode_all(tokenizer, prompts)
    target_ids = _encode_all(tokenizer, [spaced(t) for t in targets])
    encoded = list(zip(prompt_ids, target_ids, strict=True))
    for (p_ids, t_ids), prompt, target in zip(encoded, prompts, targets, strict=True):
        if not p_ids or not t_ids:
            raise ValueError(f"empty tokenisation for prompt {prompt!r} / target {target!r}")
    rows, row_of = pack_rows(encoded)
    # Sort rows by length so each batch pads little; scatter results back to input order.
    order = sorted(range(len(rows)), key=lambda r: len(rows[r]))
    pairs_of_row: list[list[int]] = [[] for _ in rows]
    for index, row in enumerate(row_of):
        pairs_of_row[row].append(index)
    results: list[TargetScore | None] = [None] * len(encoded)
    device = next(model.parameters()).device
    pad_id = pad_id_of(tokenizer)
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        members = [(position, i) for position, r in enumerate(chunk) for i in pairs_of_row[r]]
        scores = _score_batch(
            model,
            [rows[r] for r in chunk],
            [(position, len(encoded[i][0]) - 1, encoded[i][1]) for position, i in members],
            pad_id,
            padding_side,
            device,
        )
        for (_, index), score in zip(members, scores, strict=True):
            results[index] = score
    return [r for r in results if r is not None]


def pack_rows(pairs: Sequence[tuple[list[int], list[int]]]) -> tuple[list[list[int]], list[int]]:
    """Input rows that cover every (prompt ids, target ids) pair, and each pair's row.

    A pair needs the tokens prompt + target[:-1] as a prefix of its row (the logits at
    positions len(prompt)-1 ... predict the target's tokens; a causal model's logits there
    do not depend on what follows). Longest targets first, a pair joins the first row of
    its prompt that starts with what it needs, else opens a row of exactly that.
    """
    rows: list[list[int]] = []
    row_of = [0] * len(pairs)
    by_prompt: dict[tuple[int, ...], list[int]] = {}
    for index in sorted(range(len(pairs)), key=lambda i: -len(pairs[i][1])):
        prompt, target = pairs[index]
        need = prompt + target[:-1]
        candidates = by_prompt.setdefault(tuple(prompt), [])
        row = next((r for r in candidates if rows[r][: len(need)] == need), None)
        if row is None:
            row = len(rows)
            rows.append(need)
            candidates.append(row)
        row_of[index] = row
    return rows, row_of


@torch.no_grad()
def _score_batch(
    model: PreTrainedModel,
    rows: list[list[int]],
    pairs: list[tuple[int, int, list[int]]],
    pad_id: int,
    padding_side: str,
    device: torch.device,
) -> list[TargetScore]:
    """Scores of `pairs` (row in `rows`, position predicting the target's first token in
    that row, target ids) from one forward pass over the padded rows."""
    inputs, offsets = padded_inputs(rows, pad_id, device, padding_side)
    whole = outputs_hooked(model)  # a memory method's hook changes the model's outputs
    # (B, T, d) after the final norm; (B, T, V) logits through the hook if whole
    hidden = model(**inputs).logits if whole else model.base_model(**inputs).last_hidden_state
    n_target = [len(ids) for _, _, ids in pairs]
    row_index = torch.tensor([row for row, _, _ in pairs], device=device)  # (P,)
    positions = torch.zeros((len(pairs), max(n_target)), dtype=torch.long)  # (P, L)
    target_ids = torch.zeros_like(positions)  # (P, L)
    valid = torch.zeros_like(positions, dtype=torch.bool)  # (P, L)
    for index, (row, first, ids) in enumerate(pairs):
        start = offsets[row] + first  # logits here predict target token 0
        positions[index, : len(ids)] = torch.arange(start, start + len(ids))
        target_ids[index, : len(ids)] = torch.tensor(ids)
        valid[index, : len(ids)] = True
    positions, target_ids, valid = positions.to(device), target_ids.to(device), valid.to(device)
    # the head only where a target token is predicted: most positions are prompt and padding
    at_targets = hidden[row_index[:, None], positions]  # (P, L, d), or (P, L, V) if whole
    logits = (at_targets if whole else model.get_output_embeddings()(at_targets)).float()
    log_probs = torch.log_softmax(logits, dim=-1)  # (P, L, V)
    token_log_probs = log_probs.gather(2, target_ids[..., None])[..., 0] * valid  # (P, L)
    counts = torch.tensor(n_target, device=device, dtype=token_log_probs.dtype)  # (P,)
    mean_nll = -token_log_probs.sum(dim=1) / counts  # (P,)
    predicted = log_probs.argmax(dim=-1)  # (P, L)
    hits = (predicted == target_ids) & valid  # (P, L)
    columns = (
        mean_nll.tolist(),
        torch.exp(-mean_nll).tolist(),
        token_log_probs[:, 0].exp().tolist(),
        (hits.sum(dim=1) / counts).tolist(),
        predicted.tolist(),
    )
    return [
        TargetScore(
            mean_nll=nll,
            prob=prob,
            first_token_prob=first,
            token_accuracy=acc,
            n_tokens=n,
            predicted=tuple(ids[:n]),
        )
        for nll, prob, first, acc, ids, n in zip(*columns, n_target, strict=True)
    ]
