"""The prompts of value searches in one padded batch, and each request's rows in it
(`optimize_values` in value_search.py)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from seqedit.methods.tokens import encode_at_subjects, fill, last_token_positions
from seqedit.schemas.requests import EditRequest, spaced

if TYPE_CHECKING:
    from seqedit.methods.value_search import ValueSearch


@dataclass
class RequestRows:
    """One request's rows of the shared padded batch: `n_rw` rewriting prompts, then the KL
    prompts (B_j rows in all).

    Attributes:
        rows: (B_j,) its row indices in the batch.
        lookup: (B_j,) subject position of each of its rows, where the delta is added.
        target_pos: (n_rw, T) positions whose next-token logits score the T target tokens.
        target: (n_rw, T) the target token ids.
    """

    rows: torch.Tensor
    lookup: torch.Tensor
    target_pos: torch.Tensor
    target: torch.Tensor
    n_rw: int

    def at_targets(self, states: torch.Tensor) -> torch.Tensor:
        """(n_rw, T, ...) of `states` (B, L, ...) at the target positions."""
        return states[self.rows[: self.n_rw, None], self.target_pos]

    def kl_log_probs(self, head: nn.Module, states: torch.Tensor) -> torch.Tensor:
        """(n_kl, V) next-token log-probabilities at the subject of each KL prompt, from
        the final hidden states (B, L, d) through the LM head."""
        kl_logits = head(states[self.rows[self.n_rw :], self.lookup[self.n_rw :]]).float()
        return torch.log_softmax(kl_logits, dim=-1)


@dataclass
class ValueBatch:
    """The prompts of several value searches in one padded batch (B rows).

    Attributes:
        inputs: the tokenised, padded prompts, (B, L).
        requests: each request's rows, in order.
        rows / lookup: (B,) every row and its subject position (the requests' concatenated).
    """

    inputs: dict[str, torch.Tensor]
    requests: list[RequestRows]
    rows: torch.Tensor
    lookup: torch.Tensor

    @classmethod
    def build(
        cls,
        tokenizer: PreTrainedTokenizerBase,
        requests: Sequence[EditRequest],
        context_templates: Sequence[str],
        search: ValueSearch,
        device: torch.device,
    ) -> ValueBatch:
        """Rewriting prompts end with every target token but the last (teacher forcing)."""
        prompts: list[str] = []
        subjects: list[str] = []
        spans: list[tuple[int, int, list[int]]] = []  # (first row, n_rw, target ids)
        for request in requests:
            ids = tokenizer(spaced(request.target_new), add_special_tokens=False)["input_ids"]
            if not ids:
                raise ValueError(f"case {request.case_id}: target_new tokenizes to nothing")
            target_prefix = tokenizer.decode(ids[:-1])
            rewriting = [fill(ctx, request.prompt) + target_prefix for ctx in context_templates]
            spans.append((len(prompts), len(rewriting), ids))
            prompts += [*rewriting, *search.kl_prompts]
            subjects += [request.subject] * (len(rewriting) + len(search.kl_prompts))
        inputs, lookup = encode_at_subjects(tokenizer, prompts, subjects, search.fact_token, device)
        mask = inputs["attention_mask"]
        all_lookup = torch.tensor(lookup, device=device)
        per_request = len(context_templates) + len(search.kl_prompts)
        rows = []
        for first, n_rw, ids in spans:
            mine = slice(first, first + per_request)
            rows.append(
                RequestRows(
                    rows=torch.arange(mine.start, mine.stop, device=device),
                    lookup=all_lookup[mine],
                    target_pos=last_token_positions(mask[first : first + n_rw], len(ids)),
                    target=torch.tensor(ids, device=device).expand(n_rw, len(ids)),
                    n_rw=n_rw,
                )
            )
        return cls(inputs, rows, torch.arange(len(prompts), device=device), all_lookup)


def target_nll(rw_logits: torch.Tensor, rows: RequestRows) -> tuple[torch.Tensor, bool]:
    """Mean target-token NLL per rewriting prompt, (n_rw,), from logits (n_rw, T, V); and
    whether every target token is the argmax at its position."""
    log_probs = torch.log_softmax(rw_logits.float(), dim=-1)
    token_lp = torch.gather(log_probs, 2, rows.target.unsqueeze(2)).squeeze(2)  # (n_rw, T)
    nll_each = -token_lp.sum(dim=1) / rows.target.shape[1]
    return nll_each, bool((log_probs.argmax(-1) == rows.target).all())
