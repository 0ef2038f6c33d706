"""Trainable share of parameters of a LoRA adapter with EasyEdit's defaults (r 8, alpha 32,
dropout 0.1; GPT-2 `c_attn`, Llama `q_proj`/`v_proj`, every layer) on GPT-2 XL and
Llama-2-7B, built from their configs on the meta device (no weights, no memory).

    .venv/bin/python bench/lora_param_share.py

EasyEdit's write-up puts LoRA editing at 0.1-1 % of the parameters. The count is made
twice: by peft (its trainable parameters) and by seqedit's `lora` method (r (d_in + d_out)
per adapted module, with its default roles), which must agree.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig, PretrainedConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from seqedit.methods import lora

SHAPES: dict[str, tuple[PretrainedConfig, list[str]]] = {
    "gpt2-xl": (
        GPT2Config(n_embd=1600, n_layer=48, n_head=25, vocab_size=50257, n_positions=1024),
        ["c_attn"],
    ),
    "llama-2-7b": (
        LlamaConfig(
            hidden_size=4096,
            intermediate_size=11008,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=32,
            vocab_size=32000,
        ),
        ["q_proj", "v_proj"],
    ),
}


def main() -> None:
    for name, (config, targets) in SHAPES.items():
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
            total = sum(p.numel() for p in model.parameters())
            shapes = lora.module_shapes(model, lora.LoraConfig(rank=8))
            ours = sum(8 * (d_out + d_in) for d_out, d_in in shapes.values())
            adapter = LoraConfig(
                r=8, lora_alpha=32, lora_dropout=0.1, target_modules=targets,
                task_type="CAUSAL_LM",
            )  # fmt: skip
            peft_model = get_peft_model(model, adapter)
        trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
        print(f"{name:<11} {'/'.join(targets):<14} {trainable:>12,} trainable of "
              f"{total:>14,} = {100 * trainable / total:.3f} % (seqedit's lora: {ours:,}, "
              f"{len(shapes)} modules)")  # fmt: skip
        if ours != trainable:
            raise SystemExit(f"{name}: seqedit counts {ours:,}, peft {trainable:,}")


if __name__ == "__main__":
    main()
