"""DPO: an edit trained as a LoRA adapter (`lora`) with a preference term (EasyEdit's DPO
editor; Rafailov et al. 2023):

    loss = alpha * NLL(target_new) + (1 - alpha) * -log sigmoid(beta * margin)
    margin = (log pi(chosen) - log ref(chosen)) - (log pi(rejected) - log ref(rejected))

Chosen is target_new. Rejected is the record's own negative answer where the data has one
(`target_neg`, which EasyEdit's DPO requires), else target_true: the answer the edit must
displace. log pi sums the completion tokens' log-probabilities after the prompt; the
reference is the model before this edit (the adapter removed), computed once. With EasyEdit's
alpha 0.99 the preference term is a 1 % regulariser; alpha 1 is the `lora` SFT loss.
"""

from __future__ import annotations

import logging
import math

import torch
from pydantic import Field
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from seqedit.methods.adapter_losses import completion_logprobs, dpo_loss, sft_loss
from seqedit.methods.config import names_for
from seqedit.methods.keys_values import frozen_parameters, model_device
from seqedit.methods.lora import (
    Adapter,
    LoraConfig,
    adapted_modules,
    completion_batch,
    module_shape,
)
from seqedit.methods.updates import EditResult
from seqedit.schemas.requests import EditRequest

log = logging.getLogger(__name__)


class DpoConfig(LoraConfig):
    """DPO editing hyperparameters (EasyEdit's llama-7b values as defaults)."""

    lr: float = Field(default=5e-5, gt=0, description="Adam learning rate.")
    num_steps: int = Field(default=7, ge=1, description="Adam steps per edit.")
    alpha: float = Field(
        default=0.99, ge=0, le=1, description="Weight of the NLL term (1: plain SFT)."
    )
    beta: float = Field(default=0.1, gt=0, description="DPO temperature on the margin.")


def rejected_target(request: EditRequest) -> str:
    """The completion DPO pushes down: `target_neg` where the record has one, else the true
    answer."""
    negative = getattr(request, "target_neg", None)
    if negative:
        return str(negative)
    if not request.target_true:
        raise ValueError(f"case {request.case_id}: DPO needs target_neg or target_true")
    return request.target_true


def dpo_edit(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    request: EditRequest,
    config: DpoConfig,
) -> EditResult:
    """Train a fresh adapter with the DPO loss; return its merged update (model untouched)."""
    names = names_for(model, config)
    modules = adapted_modules(config, names, model.config.num_hidden_layers)
    shapes = {m: module_shape(model, m, names.rewrite_weight_transposed) for m in modules}
    device = model_device(model)
    adapter = Adapter(shapes, config, device)
    rejected = request.model_copy(update={"target_new": rejected_target(request)})
    chosen_ids, chosen_labels = completion_batch(tokenizer, request, device)
    rejected_ids, rejected_labels = completion_batch(tokenizer, rejected, device)
    with torch.no_grad():  # the reference: the model before this edit
        reference = (
            completion_logprobs(model(input_ids=chosen_ids).logits, chosen_labels),
            completion_logprobs(model(input_ids=rejected_ids).logits, rejected_labels),
        )
    optimizer = torch.optim.Adam(
        adapter.parameters(), lr=config.lr, weight_decay=config.weight_decay
    )
    initial_loss = initial_nll = math.nan
    with frozen_parameters(model):
        for _ in range(config.num_steps):
            with adapter.installed(model, training=True):
                chosen_logits = model(input_ids=chosen_ids).logits
                rejected_logits = model(input_ids=rejected_ids).logits
            nll = sft_loss(chosen_logits, chosen_labels)
            policy = (
                completion_logprobs(chosen_logits, chosen_labels),
                completion_logprobs(rejected_logits, rejected_labels),
            )
            loss = dpo_loss(nll, policy, reference, alpha=config.alpha, beta=config.beta)
            if math.isnan(initial_loss):
                initial_loss, initial_nll = float(loss.detach()), float(nll.detach())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        with torch.no_grad(), adapter.installed(model, training=False):
            final_nll = float(sft_loss(model(input_ids=chosen_ids).logits, chosen_labels))
    deltas = adapter.deltas()
    norm = math.sqrt(sum(float((d.left @ d.right.T).norm()) ** 2 for d in deltas))
    log.info("DPO case %d: loss %.4f at the start, NLL %.4f -> %.4f, ||dW|| %.4g",
             request.case_id, initial_loss, initial_nll, final_nll, norm)  # fmt: skip
    return EditResult(
        updates=list(deltas),
        loss=final_nll,
        steps=config.num_steps,
        key=torch.empty(0),
        value=torch.empty(0),
        initial_loss=initial_nll,
        initial_target_prob=math.exp(-initial_nll),
        target_prob=math.exp(-final_nll),
        update_norm=norm,
        extras={"initial_dpo_loss": initial_loss},
    )
