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

import torch
from pydantic import Field
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from seqedit.methods.adapter_losses import completion_logprobs, dpo_loss, sft_loss
from seqedit.methods.keys_values import model_device
from seqedit.methods.lora import LoraConfig, LoraContext, adapter_result, method_record, new_adapter
from seqedit.methods.lora_adapter import completion_batch, train_adapter
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
    if request.target_neg:
        return request.target_neg
    if not request.target_true:
        raise ValueError(f"case {request.case_id}: DPO needs target_neg or target_true")
    return request.target_true


def dpo_edit(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    request: EditRequest,
    config: DpoConfig,
    context: LoraContext,
) -> EditResult:
    """Train the adapter with the DPO loss; return the weight change (model untouched)."""
    adapter = new_adapter(model, config, context)
    device = model_device(model)
    rejected = request.model_copy(update={"target_new": rejected_target(request)})
    chosen_ids, chosen_labels = completion_batch(tokenizer, request, device)
    rejected_ids, rejected_labels = completion_batch(tokenizer, rejected, device)
    with torch.no_grad():  # the reference: the model before this edit
        reference = (
            completion_logprobs(model(input_ids=chosen_ids).logits, chosen_labels),
            completion_logprobs(model(input_ids=rejected_ids).logits, rejected_labels),
        )

    def nll() -> torch.Tensor:
        return sft_loss(model(input_ids=chosen_ids).logits, chosen_labels)

    def loss() -> torch.Tensor:
        chosen_logits = model(input_ids=chosen_ids).logits
        rejected_logits = model(input_ids=rejected_ids).logits
        policy = (
            completion_logprobs(chosen_logits, chosen_labels),
            completion_logprobs(rejected_logits, rejected_labels),
        )
        chosen_nll = sft_loss(chosen_logits, chosen_labels)
        return dpo_loss(chosen_nll, policy, reference, alpha=config.alpha, beta=config.beta)

    before, after = train_adapter(model, adapter, config, loss, nll)
    log.info("DPO case %d: NLL of target_new %.4f -> %.4f", request.case_id, before, after)
    return adapter_result(adapter, before, after, config, context)


DPO = method_record("dpo", DpoConfig, dpo_edit, "DPO")
