"""LoRA: an edit trained as a low-rank adapter on some linear maps of every (or listed)
block (EasyEdit's LoRA editor, Hu et al. 2021).

For each target module with weight W (d_out, d_in), the adapter adds
    h = W x + s * B A dropout(x),    A (r, d_in), B (d_out, r),  s = lora_alpha / r
trained with Adam on the request's target tokens after its prompt (`adapter_losses.sft_loss`;
prompt masked), every base weight frozen. Two sequential modes:
  * `continue` (EasyEdit's): one adapter across all edits. Edit t starts from the factors
    (A, B) that edit t-1 left (the sequential state; the first edit starts from peft's
    init, A Kaiming-uniform with a = sqrt(5), B = 0) and trains them to (A', B'). The model
    already holds s B A merged, so the step logged is the change s (B' A' - B A): left
    [s B', -s B] (d_out, 2r), right [A', A]^T (d_in, 2r) (the first edit too: B = 0 there).
  * `merge`: a fresh adapter per edit, merged: left s B (d_out, r), right A^T (d_in, r).
Either way the weights after t edits are W + s B_t A_t (continue) or W plus the sum of the
merged adapters (merge), and `seqedit export --format peft` writes them as a peft adapter.

Departures from EasyEdit's `lora_main.py`, on purpose:
  * a plain LoRA adapter (EasyEdit's gpt2-xl file asks peft for AdaLoRA);
  * prompt and target are tokenised separately and joined (as `scoring` does), with no
    end-of-text token after the target (EasyEdit trains "<prompt> <target> <|endoftext|>");
  * the adapter runs as forward hooks on our module names (Conv1D and nn.Linear alike),
    not by wrapping modules with peft; the math is peft's. In `continue` mode dropout
    touches only the new step's change s (B'A' - BA) x, not the merged s B A x (the same
    function as peft's when dropout is off: at evaluation, and with `lora_dropout: 0`).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
from pydantic import Field
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from seqedit.methods.adapter_losses import sft_loss
from seqedit.methods.arch import ModuleNames, role_of_module
from seqedit.methods.config import MethodConfig
from seqedit.methods.keys_values import model_device
from seqedit.methods.lora_adapter import Adapter, Factors, completion_batch, train_adapter
from seqedit.methods.method import (
    Derived,
    EditMethod,
    Footprint,
    HparamsImport,
    SequentialState,
    edited_shapes,
    empty,
)
from seqedit.methods.updates import EditResult, LowRankDelta, Update
from seqedit.schemas.requests import EditRequest

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
    weight_decay: float = Field(default=0.0, ge=0, description="Adam's (L2) weight decay.")
    mode: Literal["continue", "merge"] = Field(
        default="continue",
        description="`continue`: one adapter trained on across edits (EasyEdit); `merge`: a "
        "fresh adapter per edit, merged into the weights.",
    )


def adapted_roles(config: LoraConfig, names: ModuleNames) -> list[str]:
    """The roles a config adapts in a family with these module names."""
    if config.roles is not None:
        return list(config.roles)
    return ["attn_qkv"] if "attn_qkv" in names.roles else ["attn_q", "attn_v"]


def adapted_modules(config: LoraConfig, names: ModuleNames, n_layers: int) -> list[str]:
    """Dotted names of the adapted modules, block by block (every block when `layers` is [])."""
    outside = [layer for layer in config.layers if not 0 <= layer < n_layers]
    if outside:
        raise ValueError(f"layers {outside}: the model has blocks 0-{n_layers - 1}")
    layers = config.layers or list(range(n_layers))
    roles = adapted_roles(config, names)
    return [names.module(role, layer) for layer in layers for role in roles]


def module_shapes(model: PreTrainedModel, config: LoraConfig) -> dict[str, tuple[int, int]]:
    """Adapted module -> (d_out, d_in) of its weight in the math convention."""
    return edited_shapes(model, config, adapted_modules)


@dataclass
class LoraContext:
    """Per-campaign LoRA state: in `continue` mode the adapter's factors after the last edit
    (the SEQUENTIAL state; empty before the first edit and in `merge` mode)."""

    factors: Factors = field(default_factory=dict)


def adapter_result(
    adapter: Adapter, before: float, after: float, config: LoraConfig, context: LoraContext
) -> EditResult:
    """The edit's result (target NLL as loss); in continue mode the context's factors move
    on to the trained ones."""
    deltas = adapter.deltas()
    norm = math.sqrt(sum(d.norm() ** 2 for d in deltas))  # Gram matrices, no dense dW
    if config.mode == "continue":
        context.factors = adapter.trained()
    return EditResult(
        updates=list(deltas),
        loss=after,
        steps=config.num_steps,
        key=torch.empty(0),
        value=torch.empty(0),
        initial_loss=before,
        initial_target_prob=math.exp(-before),
        target_prob=math.exp(-after),
        update_norm=norm,
    )


def new_adapter(model: PreTrainedModel, config: LoraConfig, context: LoraContext) -> Adapter:
    """A fresh adapter (merge mode, or the first edit) or the context's, continued."""
    start = context.factors if config.mode == "continue" else None
    return Adapter(module_shapes(model, config), config, model_device(model), start)


def lora_edit(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    request: EditRequest,
    config: LoraConfig,
    context: LoraContext,
) -> EditResult:
    """Train the adapter on `request`; return the weight change (model untouched)."""
    adapter = new_adapter(model, config, context)
    ids, labels = completion_batch(tokenizer, request, model_device(model))

    def nll() -> torch.Tensor:
        return sft_loss(model(input_ids=ids).logits, labels)

    before, after = train_adapter(model, adapter, config, nll, nll)
    log.info("LoRA case %d on %d modules: NLL %.4f -> %.4f",
             request.case_id, len(adapter.factors), before, after)  # fmt: skip
    return adapter_result(adapter, before, after, config, context)


# --- the method record, shared by `dpo` --------------------------------------------------------


def prepare(
    _model: PreTrainedModel,
    _tokenizer: PreTrainedTokenizerBase,
    _config: LoraConfig,
    _second_moments: dict[int, torch.Tensor] | None,
    _derived: Derived | None = None,
    /,
) -> LoraContext:
    return LoraContext()


_A, _B = "lora_a.", "lora_b."


def state(context: LoraContext) -> SequentialState:
    """{"lora_a.<module>": A (r, d_in), "lora_b.<module>": B (d_out, r)} copies."""
    out = {}
    for module, (a, b) in context.factors.items():
        out[_A + module], out[_B + module] = a.clone(), b.clone()
    return out


def load_state(context: LoraContext, saved: SequentialState) -> None:
    """Put saved adapter factors back (continue mode; empty before the first edit)."""
    modules = [k[len(_A) :] for k in saved if k.startswith(_A)]
    unknown = [k for k in saved if not k.startswith((_A, _B))]
    missing = [m for m in modules if _B + m not in saved]
    if unknown or missing or len(saved) != 2 * len(modules):
        raise ValueError(f"LoRA state: not pairs of lora_a./lora_b. factors: {sorted(saved)}")
    context.factors = {m: (saved[_A + m].clone(), saved[_B + m].clone()) for m in modules}


def footprint_step(model: PreTrainedModel, config: LoraConfig, _n: int) -> list[Update]:
    """Per adapted module left (d_out, k) and right (d_in, k) float32 factors: k = r in
    merge mode, 2r in continue mode."""
    k = config.rank * (2 if config.mode == "continue" else 1)
    return [
        LowRankDelta(
            m, empty(model, (d_out, k), torch.float32), empty(model, (d_in, k), torch.float32)
        )
        for m, (d_out, d_in) in module_shapes(model, config).items()
    ]


def footprint_state(model: PreTrainedModel, config: LoraConfig, edits: int) -> SequentialState:
    """The continued adapter's A and B per module (none in merge mode or before an edit)."""
    if config.mode != "continue" or edits == 0:
        return {}
    out = {}
    for module, (d_out, d_in) in module_shapes(model, config).items():
        out[_A + module] = empty(model, (config.rank, d_in), torch.float32)
        out[_B + module] = empty(model, (d_out, config.rank), torch.float32)
    return out


def net_update(config: LoraConfig, steps: list[list[Update]]) -> list[Update]:
    """The total change of steps 0..t. Continue mode: the steps telescope to s B_t A_t, the
    first r columns of the last step that changed something. Merge mode: every step's."""
    if config.mode == "merge":
        return [update for updates in steps for update in updates]
    last = next((updates for updates in reversed(steps) if updates), [])
    r = config.rank
    return [
        LowRankDelta(d.module, d.left[:, :r].contiguous(), d.right[:, :r].contiguous())
        for d in last
        if isinstance(d, LowRankDelta)
    ]


def target_modules(value: Any) -> tuple[dict[str, Any], str]:
    """EasyEdit's `target_modules` (peft's module names: ["c_attn"], ["q_proj", "v_proj"])
    -> our `roles`."""
    given = [value] if isinstance(value, str) else value
    if not isinstance(given, list) or not given or not all(isinstance(v, str) for v in given):
        raise ValueError(f"a list of module names, got {value!r}")
    roles = [role_of_module(name) for name in given]
    return {"roles": roles}, f"target_modules: {given} -> roles: {roles}"


def lora_type(value: Any) -> tuple[dict[str, Any], str]:
    """EasyEdit's `lora_type`: plain LoRA is ours; AdaLoRA (its gpt2-xl and DPO files) is read
    as plain LoRA of the same rank, with a note."""
    if value not in ("lora", "adalora"):
        raise ValueError(f"'lora' or 'adalora', got {value!r}")
    note = "lora_type: adalora -> a plain LoRA adapter of the same rank (seqedit has no "
    return {}, (note + "AdaLoRA rank allocation)") if value == "adalora" else "lora_type: lora"


def hparams_import(alg: str) -> HparamsImport:
    """How EasyEdit's LoRA / DPO files read (the reference code has neither)."""
    return HparamsImport(
        easyedit_alg=alg,
        dropped={
            "kl_factor": "read by no EasyEdit LoRA/DPO code",
            "norm_constraint": "read by no EasyEdit LoRA/DPO code",
        },
        converted={"target_modules": target_modules, "lora_type": lora_type},
    )


QUICK_HPARAMS = {"layers": [0], "num_steps": 10, "lr": 1e-2, "lora_dropout": 0.0}
TESTBED_HPARAMS = {"num_steps": 30, "lr": 1e-3}
"""Of `lora` and `dpo` alike: the tests' tiny testbed, and the synthetic-300 testbed (lr 1e-3:
docs/methods.md, "LoRA and DPO")."""


def method_record(name: str, config_cls: type[LoraConfig], edit: Any, alg: str) -> EditMethod:
    """The `EditMethod` of an adapter-trained method (`lora`, `dpo`): everything but the
    config, the edit and the hparams is shared."""
    return EditMethod(
        name=name,
        version="1",
        config_cls=config_cls,
        layers=lambda config: list(config.layers),
        modules=adapted_modules,
        uses_second_moment=lambda config: False,
        prepare=prepare,
        edit=edit,
        state=state,
        load_state=load_state,
        footprint=Footprint(step=footprint_step, state=footprint_state),
        hparams_import=hparams_import(alg),
        net_update=net_update,
        quick_hparams=dict(QUICK_HPARAMS),
        testbed_hparams=dict(TESTBED_HPARAMS),
    )


LORA = method_record("lora", LoraConfig, lora_edit, "LoRA")
