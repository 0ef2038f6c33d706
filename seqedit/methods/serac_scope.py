"""SERAC's scope classifier and edit memory, pure torch (Mitchell et al., ICML 2022).

SERAC decides, for every query, whether it falls in the scope of an edit held in its memory.
The published classifier embeds the edit and the query and scores their similarity with a
trained model. Ours is an embedding-similarity classifier over the BASE model's (frozen)
input token embeddings, small enough to train on a CPU and causal, so that the mixed model
(`serac.py`) stays an autoregressive LM:

    key token i of an edit (its filled prompt):  k_i = normalise(P e_i), w_i = softplus(a.e_i + b)
    query token s:                               q_s = normalise(P e_s)
    score of edit j at query position t:         S_jt = sum_i w_i max_{s<=t} k_i.q_s / sum_i w_i
                                                 (i over the key tokens of edit j)
    in-scope probability:                        sigma_jt = sigmoid(tau * S_jt + beta)

with P (dim, d), a (d,), b, tau and beta trained. Each key token looks for its best match
among the query tokens seen so far; the learned weights w let the subject's tokens count and
the relation's and the context's barely (a neighbourhood prompt shares the relation with its
edit, a paraphrase the subject). Every position is scored: a hook cannot tell where a prompt
ends inside a packed prompt + target row, and S_jt depends on tokens up to t only.

`EditMemory` holds the edits: each one's key token ids (classifier) and prefix token ids
(what the counterfactual model reads before the query: "<prompt> <target_new>" and a
separator), and the classifier's encodings of all key tokens, kept up to date as edits land.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn
from transformers import PreTrainedTokenizerBase

from seqedit.schemas.requests import EditRequest, spaced


class ScopeConfig(BaseModel):
    """The shape and initial calibration of the scope classifier."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    dim: int = Field(default=64, ge=1, description="Width of the projected token embeddings.")
    scale: float = Field(default=10.0, gt=0, description="Initial tau (similarity scale).")
    bias: float = Field(default=-7.0, description="Initial beta (logit at similarity 0).")


class ScopeClassifier(nn.Module):
    """sigma_jt = sigmoid(tau * S_jt + beta) over the base model's token embeddings (module doc).

    Args:
        d_model: width of the base model's input embeddings.
        config: `ScopeConfig`.
    """

    def __init__(self, d_model: int, config: ScopeConfig) -> None:
        super().__init__()
        self.proj = nn.Linear(d_model, config.dim, bias=False)
        nn.init.orthogonal_(self.proj.weight)
        self.importance = nn.Linear(d_model, 1)
        nn.init.zeros_(self.importance.weight)
        nn.init.zeros_(self.importance.bias)
        self.scale = nn.Parameter(torch.tensor(float(config.scale)))
        self.bias = nn.Parameter(torch.tensor(float(config.bias)))

    def encode(self, embeddings: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Token embeddings (N, d) -> unit vectors (N, dim) and importance weights (N,) > 0."""
        emb = embeddings.float()
        vectors = F.normalize(self.proj(emb), dim=-1)
        weights = F.softplus(self.importance(emb).squeeze(-1)) + 1e-4
        return vectors, weights

    def logits(
        self,
        keys: torch.Tensor,
        weights: torch.Tensor,
        owner: torch.Tensor,
        n_entries: int,
        query: torch.Tensor,
    ) -> torch.Tensor:
        """In-scope logits (M, T) of `n_entries` edits at every query position.

        Args:
            keys: (N, dim) unit vectors of all key tokens of all edits.
            weights: (N,) their importance weights.
            owner: (N,) int64, the edit (0..M-1) each key token belongs to.
            n_entries: M.
            query: (T, dim) unit vectors of the query tokens.
        """
        similarity = keys @ query.T  # (N, T)
        best_so_far = torch.cummax(similarity, dim=1).values  # (N, T)
        weighted = best_so_far * weights[:, None]
        numerator = weighted.new_zeros(n_entries, query.shape[0]).index_add(0, owner, weighted)
        denominator = weights.new_zeros(n_entries).index_add(0, owner, weights)
        return self.scale * numerator / denominator[:, None] + self.bias  # (M, T)


def separator_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """What ends an edit's prefix: the end-of-text token, or a newline without one."""
    if tokenizer.eos_token_id is not None:
        return [int(tokenizer.eos_token_id)]
    return list(tokenizer("\n", add_special_tokens=False)["input_ids"])


def edit_prefix(
    tokenizer: PreTrainedTokenizerBase, request: EditRequest, separator: Sequence[int]
) -> list[int]:
    """Token ids of "<filled prompt> <target_new>" and the separator."""
    text = request.filled_prompt + spaced(request.target_new)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"]) + list(separator)


@dataclass
class EditMemory:
    """The edits SERAC holds: key and prefix token ids per edit, and the key encodings.

    Attributes:
        key_ids: per edit, (n_i,) int64 token ids of its filled prompt.
        prefix_ids: per edit, (p_i,) int64 ids the counterfactual model reads first.
        keys: (N, dim) classifier vectors of every key token (all edits, in order).
        weights: (N,) their importance weights.
        owner: (N,) int64 edit index of each key token.
    """

    key_ids: list[torch.Tensor] = field(default_factory=list)
    prefix_ids: list[torch.Tensor] = field(default_factory=list)
    keys: torch.Tensor | None = None
    weights: torch.Tensor | None = None
    owner: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.key_ids)

    @torch.no_grad()
    def add(
        self,
        key_ids: torch.Tensor,
        prefix_ids: torch.Tensor,
        classifier: ScopeClassifier,
        embed: nn.Module,
    ) -> None:
        """Append one edit and its key encodings (`embed`: the base model's embeddings)."""
        vectors, weights = classifier.encode(embed(key_ids))
        owner = torch.full((len(key_ids),), len(self), dtype=torch.long, device=key_ids.device)
        self.key_ids.append(key_ids)
        self.prefix_ids.append(prefix_ids)
        if self.keys is None or self.weights is None or self.owner is None:
            self.keys, self.weights, self.owner = vectors, weights, owner
        else:
            self.keys = torch.cat([self.keys, vectors])
            self.weights = torch.cat([self.weights, weights])
            self.owner = torch.cat([self.owner, owner])

    @torch.no_grad()
    def scope(
        self, classifier: ScopeClassifier, embed: nn.Module, query_ids: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """For query ids (T,): the best edit's in-scope probability (T,) and its index (T,)
        at every position; all zeros (and index 0) for an empty memory."""
        if self.keys is None or self.weights is None or self.owner is None:
            zeros = torch.zeros(len(query_ids), device=query_ids.device)
            return zeros, zeros.long()
        query, _ = classifier.encode(embed(query_ids))
        logits = classifier.logits(self.keys, self.weights, self.owner, len(self), query)
        best, index = logits.max(dim=0)  # (T,), (T,)
        return torch.sigmoid(best), index

    def state(self) -> dict[str, torch.Tensor]:
        """The memory as four tensors: ids concatenated, and each edit's lengths."""
        device = self.keys.device if self.keys is not None else torch.device("cpu")
        empty = torch.zeros(0, dtype=torch.long, device=device)
        return {
            "key_ids": torch.cat(self.key_ids) if self.key_ids else empty,
            "key_lengths": torch.tensor([len(k) for k in self.key_ids], dtype=torch.long),
            "prefix_ids": torch.cat(self.prefix_ids) if self.prefix_ids else empty,
            "prefix_lengths": torch.tensor([len(p) for p in self.prefix_ids], dtype=torch.long),
        }

    def load(
        self, state: dict[str, torch.Tensor], classifier: ScopeClassifier, embed: nn.Module
    ) -> None:
        """Replace the memory by a saved `state()` (the encodings are recomputed)."""
        key_lengths = state["key_lengths"].tolist()
        prefix_lengths = state["prefix_lengths"].tolist()
        total_prefix = len(state["prefix_ids"])
        if sum(key_lengths) != len(state["key_ids"]) or sum(prefix_lengths) != total_prefix:
            raise ValueError("SERAC state: the ids and their lengths disagree")
        keys = torch.split(state["key_ids"], key_lengths) if key_lengths else ()
        prefixes = torch.split(state["prefix_ids"], prefix_lengths) if prefix_lengths else ()
        if len(keys) != len(prefixes):
            raise ValueError(f"SERAC state: {len(keys)} keys but {len(prefixes)} prefixes")
        self.key_ids, self.prefix_ids = [], []
        self.keys = self.weights = self.owner = None
        for key, prefix in zip(keys, prefixes, strict=True):
            self.add(key.clone(), prefix.clone(), classifier, embed)
