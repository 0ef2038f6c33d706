"""MEND's training loss (Mitchell et al., ICLR 2022), pure torch: what `MendTrainer`
minimises over the editor's parameters. The network and its update are in `mend.py`."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from pydantic import BaseModel, ConfigDict, Field
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from seqedit.methods.arch import module_weight
from seqedit.methods.keys_values import model_device
from seqedit.methods.mend import EditExample, MendEditor, token_factors
from seqedit.methods.updates import LowRankDelta
from seqedit.schemas.requests import EditRequest


class MendLossConfig(BaseModel):
    """Weights of MEND's training loss (reference: `edit` and `loc` coefficients)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    c_edit: float = Field(default=0.1, ge=0, description="Weight of the edit NLL.")
    c_loc: float = Field(default=1.0, ge=0, description="Weight of the locality KL.")


def _post_params(
    model: PreTrainedModel, updates: Sequence[LowRankDelta], transposed: bool
) -> dict[str, torch.Tensor]:
    """Edited weights W + dW by parameter name, in storage layout, differentiable in dW."""
    params = {}
    for update in updates:
        weight, is_transposed = module_weight(model, update.module, transposed)
        dense = update.dense().to(weight.dtype)  # (d_out, d_in)
        params[f"{update.module}.weight"] = weight + (dense.T if is_transposed else dense)
    return params


def mend_loss(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    request: EditRequest,
    editor: MendEditor,
    weights: MendLossConfig,
    *,
    transposed: bool,
    factors: Sequence[tuple[torch.Tensor, torch.Tensor]] | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """MEND's training loss for one request, differentiable in the editor's parameters:
    c_edit * NLL of target_new after its first paraphrase (the prompt when it has none)
    under the edited weights + c_loc * KL(pre || post) over the tokens of its first
    neighbourhood prompt (0 when it has none). The base model is not changed; its weights
    are replaced in a `functional_call`. `factors`: the request's `token_factors`, when the
    caller has them already (the trainer takes the standardiser's statistics from them
    first). Returns (loss, metrics): loss/edit, loss/loc,
    loss/total, edit/acc (the paraphrase after the edit), acc/pre, acc/post and nll/pre,
    nll/post (the rewrite prompt before and after).
    """
    device = model_device(model)
    example = EditExample.of(tokenizer, request, device)
    if factors is None:
        factors = token_factors(model, example, editor.modules_edited)
    updates = [editor.update(i, u, d) for i, (u, d) in enumerate(factors)]
    post = _post_params(model, updates, transposed)

    def logits_after(input_ids: torch.Tensor) -> torch.Tensor:
        return torch.func.functional_call(model, post, (), {"input_ids": input_ids}).logits

    paraphrase = EditExample.of(
        tokenizer, request, device, (request.paraphrase_prompts or [None])[0]
    )
    edit_logits = logits_after(paraphrase.input_ids)
    loss_edit = paraphrase.nll(edit_logits)
    loss_loc = torch.zeros((), device=device)
    if request.neighborhood_prompts:
        ids = torch.tensor(
            [tokenizer(request.neighborhood_prompts[0].prompt)["input_ids"]], device=device
        )
        with torch.no_grad():
            pre = torch.log_softmax(model(input_ids=ids).logits.float(), dim=-1)  # (1, L, V)
        post_lp = torch.log_softmax(logits_after(ids).float(), dim=-1)
        loss_loc = (pre.exp() * (pre - post_lp)).sum(-1).mean()
    total = weights.c_edit * loss_edit + weights.c_loc * loss_loc
    with torch.no_grad():
        before = model(input_ids=example.input_ids).logits
        after = logits_after(example.input_ids)
        metrics = {
            "loss/edit": float(loss_edit.detach()),
            "loss/loc": float(loss_loc.detach()),
            "loss/total": float(total.detach()),
            "edit/acc": float(paraphrase.correct(edit_logits)),
            "acc/pre": float(example.correct(before)),
            "acc/post": float(example.correct(after)),
            "nll/pre": float(example.nll(before)),
            "nll/post": float(example.nll(after)),
        }
    return total, metrics
