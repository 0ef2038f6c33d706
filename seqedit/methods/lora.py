"""LoRA: an edit trained as a low-rank adapter on some linear maps of every (or listed)
block, then merged (EasyEdit's LoRA editor, Hu et al. 2021).

For each target module with weight W (d_out, d_in), the adapter adds
    h = W x + (alpha / r) * B A dropout(x),    A (r, d_in), B (d_out, r)
with A drawn like peft's (Kaiming-uniform, a = sqrt(5)) and B = 0, so training starts at
the unedited model. A and B are trained with Adam on the request's target tokens after its
prompt (`adapter_losses.sft_loss`; prompt masked), every base weight frozen. The edit is
dW = (alpha / r) B A per module, logged as low-rank factors: left (alpha / r) B (d_out, r),
right A^T (d_in, r).

Departures from EasyEdit's `lora_main.py`, on purpose:
  * a plain LoRA adapter (EasyEdit's gpt2-xl file asks peft for AdaLoRA);
  * prompt and target are tokenised separately and joined (as `scoring` does), with no
    end-of-text token after the target (EasyEdit trains "<prompt> <target> <|endoftext|>");
  * the adapter runs as forward hooks on our module names (Conv1D and nn.Linear alike),
    not by wrapping modules with peft; the math is peft's. `seqedit export` writes the
    edits in peft's format.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from pydantic import Field
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from seqedit.methods.adapter_losses import IGNORE, sft_loss
from seqedit.methods.arch import ModuleNames, module_weight
from seqedit.methods.config import MethodConfig, names_for
from seqedit.methods.keys_values import frozen_parameters, model_device
from seqedit.methods.updates import EditResult, LowRankDelta
from seqedit.schemas.requests import EditRequest, spaced

log = logging.getLogger(__name__)


class LoraConfig(MethodConfig):
    """LoRA editing hyperparameters (EasyEdit's field names; its gpt2-xl values)."""

    step_budget_fields: ClassVar[tuple[str, ...]] = ("num_steps",)

    rank: int = Field(default=8, ge=1, description="r, the adapter's rank per module.")
    lora_alpha: float = Field(default=32.0, gt=0, description="Scale numerator: dW = alpha/r BA.")
    lora_dropout: float = Field(
        default=0.1, ge=0, lt=1, description="Dropout on the adapter's input while training."
    )
    roles: list[str] | None = Field(
        default=None,
        description="Roles of the adapted linear maps (`arch.ROLES`); None: EasyEdit's "
        "choice, the fused qkv projection where the family has one (GPT-2 `c_attn`), else "
        "the q and v projections (Llama family `q_proj`, `v_proj`).",
    )
    layers: list[int] = Field(
        default_factory=list, description="Blocks adapted; empty: every block (EasyEdit)."
    )
    lr: float = Field(default=5e-3, gt=0, description="Adam learning rate.")
    num_steps: int = Field(default=30, ge=1, description="Adam steps per edit.")
    weight_decay: float = Field(default=0.0, ge=0)


def adapted_roles(config: LoraConfig, names: ModuleNames) -> list[str]:
    """The roles a config adapts in a family with these module names."""
    if config.roles is not None:
        return list(config.roles)
    return ["attn_qkv"] if "attn_qkv" in names.roles else ["attn_q", "attn_v"]


def adapted_modules(config: LoraConfig, names: ModuleNames, n_layers: int) -> list[str]:
    """Dotted names of the adapted modules, block by block."""
    layers = config.layers or list(range(n_layers))
    roles = adapted_roles(config, names)
    return [names.module(role, layer) for layer in layers for role in roles]


def module_shape(model: PreTrainedModel, module: str, transposed: bool) -> tuple[int, int]:
    """(d_out, d_in) of a module's weight in the math convention."""
    weight, is_transposed = module_weight(model, module, transposed)
    rows, cols = weight.shape
    return (int(cols), int(rows)) if is_transposed else (int(rows), int(cols))


class Adapter:
    """Trainable A (r, d_in) and B (d_out, r) per module, added to its output by hooks."""

    def __init__(
        self, shapes: dict[str, tuple[int, int]], config: LoraConfig, device: torch.device
    ) -> None:
        self.scale = config.lora_alpha / config.rank
        self.dropout = config.lora_dropout
        self.factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for module, (d_out, d_in) in shapes.items():
            a = torch.empty(config.rank, d_in, device=device)
            torch.nn.init.kaiming_uniform_(a, a=math.sqrt(5))
            b = torch.zeros(d_out, config.rank, device=device)
            self.factors[module] = (a.requires_grad_(True), b.requires_grad_(True))

    def parameters(self) -> list[torch.Tensor]:
        return [t for pair in self.factors.values() for t in pair]

    @contextmanager
    def installed(self, model: PreTrainedModel, *, training: bool) -> Iterator[None]:
        """The adapter's forward hooks on `model`, removed on exit."""
        handles = []
        for module, (a, b) in self.factors.items():

            def hook(_mod: Any, args: tuple[Any, ...], out: torch.Tensor, a=a, b=b) -> Any:
                x = F.dropout(args[0], self.dropout, training=training)
                return out + self.scale * (x.to(a.dtype) @ a.T @ b.T).to(out.dtype)

            handles.append(model.get_submodule(module).register_forward_hook(hook))
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def deltas(self) -> list[LowRankDelta]:
        """dW = scale B A per module, as left (d_out, r) and right (d_in, r) factors."""
        return [
            LowRankDelta(module, (self.scale * b).detach().clone(), a.detach().T.contiguous())
            for module, (a, b) in self.factors.items()
        ]


def completion_batch(
    tokenizer: PreTrainedTokenizerBase, request: EditRequest, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """(1, T) ids of prompt + target and (1, T) labels with the prompt masked."""
    prompt = list(tokenizer(request.filled_prompt)["input_ids"])
    target = list(tokenizer(spaced(request.target_new), add_special_tokens=False)["input_ids"])
    if not prompt or not target:
        raise ValueError(f"case {request.case_id}: empty tokenisation of prompt or target")
    ids = torch.tensor([prompt + target], device=device)
    labels = torch.tensor([[IGNORE] * len(prompt) + target], device=device)
    return ids, labels


def lora_edit(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    request: EditRequest,
    config: LoraConfig,
) -> EditResult:
    """Train a fresh adapter on `request` and return its merged update (model untouched)."""
    names = names_for(model, config)
    modules = adapted_modules(config, names, model.config.num_hidden_layers)
    shapes = {m: module_shape(model, m, names.rewrite_weight_transposed) for m in modules}
    adapter = Adapter(shapes, config, model_device(model))
    ids, labels = completion_batch(tokenizer, request, model_device(model))
    optimizer = torch.optim.Adam(
        adapter.parameters(), lr=config.lr, weight_decay=config.weight_decay
    )
    initial_loss = math.nan
    with frozen_parameters(model):
        for _ in range(config.num_steps):
            with adapter.installed(model, training=True):
                loss = sft_loss(model(input_ids=ids).logits, labels)
            if math.isnan(initial_loss):
                initial_loss = float(loss.detach())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        with torch.no_grad(), adapter.installed(model, training=False):
            final_loss = float(sft_loss(model(input_ids=ids).logits, labels))
    deltas = adapter.deltas()
    norm = math.sqrt(sum(float((d.left @ d.right.T).norm()) ** 2 for d in deltas))
    log.info("LoRA case %d on %d modules: loss %.4f -> %.4f, ||dW|| %.4g",
             request.case_id, len(deltas), initial_loss, final_loss, norm)  # fmt: skip
    return EditResult(
        updates=list(deltas),
        loss=final_loss,
        steps=config.num_steps,
        key=torch.empty(0),
        value=torch.empty(0),
        initial_loss=initial_loss,
        initial_target_prob=math.exp(-initial_loss),
        target_prob=math.exp(-final_loss),
        update_norm=norm,
    )
