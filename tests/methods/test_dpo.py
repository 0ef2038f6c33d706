"""DPO edits: alpha = 1 is the LoRA SFT edit, and a step raises the chosen-over-rejected
margin."""

from __future__ import annotations

import torch
from transformers import PreTrainedTokenizerFast

from seqedit.methods.adapter_losses import completion_logprobs
from seqedit.methods.arch import module_names_for, module_weight
from seqedit.methods.dpo import DpoConfig, dpo_edit, rejected_target
from seqedit.methods.lora import LoraConfig, LoraContext, lora_edit
from seqedit.methods.lora_adapter import completion_batch
from tests.methods.test_lora import REQUEST, tiny


def margin(model: torch.nn.Module, tokenizer: PreTrainedTokenizerFast) -> float:
    """log pi(chosen) - log pi(rejected), each summed over its completion tokens."""
    rejected = REQUEST.model_copy(update={"target_new": rejected_target(REQUEST)})
    logps = []
    for request in (REQUEST, rejected):
        ids, labels = completion_batch(tokenizer, request, torch.device("cpu"))
        logps.append(completion_logprobs(model(input_ids=ids).logits, labels))
    return float(logps[0] - logps[1])


def test_alpha_one_is_the_lora_edit() -> None:
    model, tokenizer = tiny("gpt2")
    fields = {"num_steps": 3, "lr": 1e-2, "lora_dropout": 0.0}
    torch.manual_seed(0)
    sft = lora_edit(model, tokenizer, REQUEST, LoraConfig(**fields), LoraContext())
    torch.manual_seed(0)
    dpo = dpo_edit(model, tokenizer, REQUEST, DpoConfig(**fields, alpha=1.0), LoraContext())
    for a, b in zip(sft.updates, dpo.updates, strict=True):
        torch.testing.assert_close(a.left, b.left, rtol=0, atol=0)
        torch.testing.assert_close(a.right, b.right, rtol=0, atol=0)


def test_one_dpo_step_raises_the_margin() -> None:
    model, tokenizer = tiny("gpt2")
    assert rejected_target(REQUEST) == "Paris"
    config = DpoConfig(num_steps=1, lr=1e-2, lora_dropout=0.0, alpha=0.0)
    torch.manual_seed(0)
    result = dpo_edit(model, tokenizer, REQUEST, config, LoraContext())
    names = module_names_for(model)
    with torch.no_grad():
        before = margin(model, tokenizer)
        for delta in result.updates:
            weight, transposed = module_weight(model, delta.module, names.rewrite_weight_transposed)
            step = delta.left @ delta.right.T
            weight += step.T if transposed else step
        after = margin(model, tokenizer)
    assert after > before
