"""SERAC's training losses, pure torch: what `SeracTrainer` minimises for one request.

For a request r (an edit "prompt -> target"), with the scope classifier C and the
counterfactual model M:
- scope: binary cross-entropy of C's in-scope logit at the LAST token of each query, for
  r's edit alone: in scope are r's rewrite prompt and paraphrases, out of scope its
  neighbourhood prompts (the same relation, another subject: the hard negatives) and the
  prompts of other requests (`others`). Positives and negatives weigh half each.
- edit: M's NLL of the target after `edit_prefix` ("<prompt> <target><sep>", as the
  memory holds it) and each in-scope query (the
  rewrite prompt and the paraphrases), mean over queries.
loss = c_scope * scope + c_edit * edit.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from seqedit.methods.keys_values import model_device
from seqedit.methods.serac_scope import ScopeClassifier, edit_prefix
from seqedit.schemas.requests import EditRequest, spaced


class SeracLossConfig(BaseModel):
    """Weights of SERAC's training loss."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    c_scope: float = Field(default=1.0, ge=0, description="Weight of the classifier's BCE.")
    c_edit: float = Field(default=1.0, ge=0, description="Weight of the counterfactual NLL.")
    max_queries: int = Field(
        default=4, ge=1, description="Paraphrases and neighbourhood prompts used per request."
    )


def _ids(tokenizer: PreTrainedTokenizerBase, text: str, device: torch.device) -> torch.Tensor:
    return torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], device=device)


def scope_logit(
    classifier: ScopeClassifier, embed: nn.Module, key_ids: torch.Tensor, query_ids: torch.Tensor
) -> torch.Tensor:
    """The in-scope logit () of `query_ids` (T,) at its last token for one edit's key (n,)."""
    keys, weights = classifier.encode(embed(key_ids))
    query, _ = classifier.encode(embed(query_ids))
    owner = torch.zeros(len(key_ids), dtype=torch.long, device=key_ids.device)
    return classifier.logits(keys, weights, owner, 1, query)[0, -1]


def counterfactual_nll(
    model: PreTrainedModel, prefix: torch.Tensor, query: torch.Tensor, target: torch.Tensor
) -> tuple[torch.Tensor, bool]:
    """The counterfactual model's mean NLL () of `target` (N,) after `prefix` (P,) and
    `query` (Q,), and whether every target token is its argmax."""
    ids = torch.cat([prefix, query, target[:-1]])[None]  # (1, P + Q + N - 1)
    logits = model(input_ids=ids, use_cache=False).logits[0, -len(target) :]  # (N, V)
    log_probs = torch.log_softmax(logits.float(), dim=-1)
    nll = -log_probs.gather(1, target[:, None]).mean()
    return nll, bool((log_probs.argmax(-1) == target).all())


def serac_loss(
    base: PreTrainedModel,
    counterfactual: PreTrainedModel,
    classifier: ScopeClassifier,
    tokenizer: PreTrainedTokenizerBase,
    request: EditRequest,
    others: Sequence[str],
    separator: Sequence[int],
    weights: SeracLossConfig,
) -> tuple[torch.Tensor, dict[str, float]]:
    """SERAC's loss for `request` (module doc), differentiable in the classifier's and the
    counterfactual model's parameters; `others`: filled prompts of other requests. Returns
    (loss, metrics): loss/scope, loss/edit, loss/total, scope/rephrase_in and
    scope/locality_in (shares routed in scope, probability > 0.5), edit/acc (a paraphrase
    answered with the target), acc/post and nll/post (the rewrite prompt)."""
    device = model_device(base)
    embed = base.get_input_embeddings()
    n = weights.max_queries
    key = _ids(tokenizer, request.filled_prompt, device)
    paraphrases = [_ids(tokenizer, p, device) for p in request.paraphrase_prompts[:n]]
    neighbours = [_ids(tokenizer, p.prompt, device) for p in request.neighborhood_prompts[:n]]
    strangers = [_ids(tokenizer, text, device) for text in others[:n]]
    positives = [key, *paraphrases]
    negatives = neighbours + strangers
    pos = torch.stack([scope_logit(classifier, embed, key, q) for q in positives])
    loss_scope = F.binary_cross_entropy_with_logits(pos, torch.ones_like(pos))
    if negatives:
        neg = torch.stack([scope_logit(classifier, embed, key, q) for q in negatives])
        loss_neg = F.binary_cross_entropy_with_logits(neg, torch.zeros_like(neg))
        loss_scope = (loss_scope + loss_neg) / 2

    target = _ids(tokenizer, spaced(request.target_new), device)
    if len(target) == 0:
        raise ValueError(f"case {request.case_id}: empty tokenisation of target_new")
    prefix = torch.tensor(edit_prefix(tokenizer, request, separator), device=device)
    results = [counterfactual_nll(counterfactual, prefix, q, target) for q in positives]
    loss_edit = torch.stack([nll for nll, _ in results]).mean()
    total = weights.c_scope * loss_scope + weights.c_edit * loss_edit
    with torch.no_grad():
        rephrase = pos[1:] if len(pos) > 1 else pos
        metrics = {
            "loss/scope": float(loss_scope),
            "loss/edit": float(loss_edit),
            "loss/total": float(total),
            "scope/rephrase_in": float((rephrase > 0).float().mean()),
            "scope/locality_in": float((neg[: len(neighbours)] > 0).float().mean())
            if neighbours
            else 0.0,
            "edit/acc": float(sum(ok for _, ok in results[1:]) / max(1, len(results) - 1))
            if len(results) > 1
            else float(results[0][1]),
            "acc/post": float(results[0][1]),
            "nll/post": float(results[0][0]),
        }
    return total, metrics
