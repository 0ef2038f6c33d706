"""GRACE: a discrete key-value codebook in front of one linear map (Hartvigsen et al., 2023).

The adaptor is the `nn.Linear` / `Conv1D` `names.module(role, layer)`. Default role
"mlp_out" (the MLP output projection): EasyEdit's GRACE files edit it for Llama, GPT-J and
Qwen, the original code T5's FFN output `wo`, and every known architecture has one (EasyEdit's
GPT-2 files edit `c_fc`: `role: mlp_in`). Codebook row i: key k_i (d_in,), the adaptor's
INPUT at the last prompt token of an edit; value v_i (d_out,), the output put in its place;
radius r_i; label, the token ids of the edit's target_new ((n, W) int64, padded with -1).

Retrieval (the hook): at EVERY position, the nearest key to the adaptor's input (Euclidean,
float32, ties to the lowest row) is retrieved when within its radius; the output there
becomes its value ('replace_last'), or that position and all later ones of the row take the
latest retrieved value ('replace_all'). Every position is a candidate because a hook cannot
tell where a prompt ends inside a packed, padded prompt + target row; the rule is causal.
Why, and its caveats: docs/methods.md, GRACE.

One edit, query q at the last prompt token, nearest key j at distance d:
  * empty codebook, or d > eps_init + r_j: ADD (q, init, eps_init);
  * labels differ: SPLIT: add (q, init, min(eps_init, d/2)), r_j <- min(r_j, d/2 - 1e-5);
    at d/2 <= 1e-5 (the same prompt again, another target) OVERWRITE row j's label and value;
  * same label: d > r_j EXPANDs ('coverage': r_j <- d; 'moving_average': also k_j <- (k_j+q)/2),
    else UPDATE; row j's value trains on from where it is.
A new value starts 'cold' (U[0, 1), torch's CPU generator) or 'warm' (the adaptor's own output
at q); `n_iter` Adam steps of `edit_lr` on the mean NLL of target_new, the adaptor output
replaced by the codebook with this edit written in, by the hook's rule.

References read, and where and why this departs from them: docs/methods.md, GRACE.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from pydantic import Field, field_validator
from torch import nn
from torch.utils.hooks import RemovableHandle
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from seqedit.methods.arch import (
    get_module,
    layer_and_role,
    module_weight,
)
from seqedit.methods.codebook import (
    NAMES,
    Plan,
    footprint_rows,
    plan_edit,
    retrieve,
    substitute,
    upsert,
)
from seqedit.methods.config import MethodConfig, names_for
from seqedit.methods.hooks import reused_outputs
from seqedit.methods.keys_values import frozen_parameters, model_device
from seqedit.methods.method import (
    Derived,
    EditMethod,
    Footprint,
    HparamsImport,
    MemoryHooks,
    SequentialState,
    empty,
)
from seqedit.methods.updates import EditResult, MemoryEntry, Update
from seqedit.schemas.requests import EditRequest, spaced

log = logging.getLogger(__name__)

_REFUSED = {
    "replacement": {"replace_prompt": "not implemented (it is not causal); use 'replace_last'"},
    "dist_fn": {n: "only 'euc' is implemented, as in both references" for n in ("mmd", "cos")},
    "val_train": {n: "perturbation training is not implemented" for n in ("adv", "pert")},
    "eps_expand": {
        "moving_avg": "spelled 'moving_average' (the reference code ignores 'moving_avg')",
        "decay": "not implemented (nor in the references)",
    },
}


class GraceConfig(MethodConfig):
    """GRACE hyperparameters: EasyEdit's names where they map (`eps` is `eps_init`) and its
    defaults (n_iter: the original's 100; EasyEdit uses 200 for gpt2-xl, 50 for llama-7b)."""

    step_budget_fields: ClassVar[tuple[str, ...]] = ("n_iter",)

    layer: int = Field(ge=0, description="Index of the block holding the adaptor.")
    role: str = Field(
        default="mlp_out",
        description="Role of the adaptor's linear map in the block ('mlp_out': the MLP output "
        "projection, as EasyEdit for Llama/GPT-J; 'mlp_in': c_fc, as EasyEdit for GPT-2).",
    )
    eps_init: float = Field(
        default=1.0, gt=0, description="Radius of a new key (EasyEdit `eps`), in input units."
    )
    n_iter: int = Field(default=100, ge=1, description="Adam steps on the value per edit.")
    edit_lr: float = Field(default=1.0, gt=0, description="Adam learning rate of the value.")
    replacement: Literal["replace_last", "replace_all"] = Field(
        default="replace_last",
        description="'replace_last': only the retrieving position's output is replaced; "
        "'replace_all': that position and every later one of the row.",
    )
    dist_fn: Literal["euc"] = Field(default="euc", description="Key distance: Euclidean.")
    val_init: Literal["cold", "warm"] = Field(
        default="cold",
        description="A new value starts at U[0, 1) ('cold') or at the adaptor's own output "
        "at the query ('warm').",
    )
    val_train: Literal["sgd"] = Field(
        default="sgd", description="Reference name of plain value training (with Adam)."
    )
    eps_expand: Literal["coverage", "moving_average"] = Field(
        default="coverage",
        description="Same label just outside a radius: grow it to the distance ('coverage'), "
        "or also move the key halfway to the query ('moving_average').",
    )

    @field_validator("replacement", "dist_fn", "val_train", "eps_expand", mode="before")
    @classmethod
    def _refuse(cls, value: Any, info: Any) -> Any:
        reason = _REFUSED[info.field_name].get(value) if isinstance(value, str) else None
        if reason:
            raise ValueError(f"{info.field_name}={value!r}: {reason}")
        return value


@dataclass
class GraceContext:
    """The codebook of one campaign and where it sits.

    Attributes:
        module: dotted name of the adaptor.
        replacement: the config's replacement rule (the hook needs it).
        keys: (n, d_in) float32. values: (n, d_out) float32. radii: (n,) float32.
        labels: (n, W) int64 target_new token ids, padded with -1.
    The tensors are replaced, never changed in place, so a state taken stays valid.
    """

    module: str
    replacement: str
    keys: torch.Tensor
    values: torch.Tensor
    radii: torch.Tensor
    labels: torch.Tensor

    def tensors(self) -> tuple[torch.Tensor, ...]:
        """(keys, values, radii, labels)."""
        return self.keys, self.values, self.radii, self.labels


def _prepare(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    config: GraceConfig,
    _second_moments: dict[int, torch.Tensor] | None,
    _derived: Derived | None = None,
    /,
) -> GraceContext:
    """An empty codebook on the model's device, shaped for the adaptor's (d_in, d_out)."""
    module = names_for(model, config).module(config.role, config.layer)
    weight, transposed = module_weight(model, module)
    d_in, d_out = weight.shape if transposed else weight.shape[::-1]
    blank = torch.zeros(0, device=weight.device)
    return GraceContext(module, config.replacement, blank.new_zeros(0, d_in),
                        blank.new_zeros(0, d_out), blank, blank.new_zeros(0, 0).long())  # fmt: skip


def _install(model: PreTrainedModel, context: GraceContext) -> RemovableHandle:
    """The hook applying the context's codebook as it is at each call."""

    def hook(_module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
        if context.keys.shape[0] == 0:
            return output
        rows = retrieve(args[0], context.keys, context.radii)
        return substitute(output, rows, context.values, context.replacement)

    return get_module(model, context.module).register_forward_hook(hook)


def _apply(context: GraceContext, entry: MemoryEntry) -> None:
    context.keys, context.values, context.radii, context.labels = upsert(
        context.tensors(), entry.tensors
    )


def _state(context: GraceContext) -> SequentialState:
    return {name: t.clone() for name, t in zip(NAMES, context.tensors(), strict=True)}


def _load_state(context: GraceContext, state: SequentialState) -> None:
    if set(state) != set(NAMES):
        raise ValueError(f"a GRACE state holds {sorted(NAMES)}, got {sorted(state)}")
    n = state["keys"].shape[0]
    wanted = {"keys": (n, context.keys.shape[1]), "values": (n, context.values.shape[1]),
              "radii": (n,), "labels": (n, state["labels"].shape[-1])}  # fmt: skip
    for name, shape in wanted.items():
        if tuple(state[name].shape) != shape:
            raise ValueError(f"GRACE state {name}: shape {tuple(state[name].shape)}, not {shape}")
    context.keys, context.values, context.radii, context.labels = (
        state[name].to(device=old.device, dtype=old.dtype).clone()
        for name, old in zip(NAMES, context.tensors(), strict=True)
    )


@contextmanager
def _adaptor_output(
    module: nn.Module, fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
) -> Iterator[None]:
    """Within the block the adaptor outputs `fn(input, own output)`. Its own output is
    recomputed with `module.forward` (no hooks), so an installed memory hook, which ran
    before, leaves no trace: an edit answers the same with or without it."""
    handle = module.register_forward_hook(lambda m, args, _out: fn(args[0], m.forward(args[0])))
    try:
        yield
    finally:
        handle.remove()


def _target_nll(logits: torch.Tensor, first: int, target: torch.Tensor) -> torch.Tensor:
    """Mean NLL of `target` (N,) read from `logits` (1, T, V) at positions first..first+N-1."""
    log_probs = torch.log_softmax(logits[0, first : first + len(target)].float(), dim=-1)
    return -log_probs.gather(1, target[:, None]).mean()


def grace_edit(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    request: EditRequest,
    config: GraceConfig,
    context: GraceContext,
) -> EditResult:
    """One GRACE edit, as a `MemoryEntry` upserting rows; model and codebook untouched.

    key = the query (d_in,), value = the trained value (d_out,); initial_loss is the NLL of
    target_new under the codebook as it stands, loss the NLL after training.
    """
    device = model_device(model)
    prompt = tokenizer(request.filled_prompt, add_special_tokens=False)["input_ids"]
    target = tokenizer(spaced(request.target_new), add_special_tokens=False)["input_ids"]
    if not prompt or not target:
        raise ValueError(f"case {request.case_id}: empty tokenisation of prompt or target")
    ids = torch.tensor([prompt + target[:-1]], device=device)  # (1, T)
    label, last = torch.tensor(target, device=device), len(prompt) - 1
    module = get_module(model, context.module)
    names = names_for(model, config)
    seen: dict[str, torch.Tensor] = {}

    def current(inputs: torch.Tensor, own: torch.Tensor) -> torch.Tensor:
        seen["inputs"], seen["own"] = inputs.detach(), own.detach()
        rows = retrieve(inputs, context.keys, context.radii)
        return substitute(own, rows, context.values, context.replacement)

    lower = [names.layer_module_tmp.format(i) for i in range(config.layer)]
    with frozen_parameters(model), reused_outputs(model, lower):
        with torch.no_grad(), _adaptor_output(module, current):
            initial_loss = float(
                _target_nll(model(input_ids=ids, use_cache=False).logits, last, label)
            )
        query = seen["inputs"][0, last].float()  # (d_in,)
        init = (torch.rand(context.values.shape[1]).to(device) if config.val_init == "cold"
                else seen["own"][0, last].float())  # fmt: skip
        plan = plan_edit(context.tensors(), query, label, init, config.eps_init,
                         config.eps_expand)  # fmt: skip
        value, steps, loss = _train_value(model, ids, last, label, module, context, plan, config)
    plan.values = plan.values.index_put((torch.tensor([plan.trained], device=device),), value[None])
    entry = MemoryEntry(
        tensors=plan.tensors(),
        info={"action": plan.action, "case_id": request.case_id, "rows": plan.rows.tolist(),
              "distance": plan.distance, "target_new": request.target_new},
    )  # fmt: skip
    log.info("GRACE case %d at %s: %s rows %s (d=%s), loss %.4f -> %.4f in %d steps",
             request.case_id, context.module, plan.action, plan.rows.tolist(), plan.distance,
             initial_loss, loss, steps)  # fmt: skip
    start = context.values[plan.rows[plan.trained]] if plan.action in ("expand", "update") else init
    return EditResult(
        updates=[entry], loss=loss, steps=steps, key=query, value=value,
        initial_loss=initial_loss, initial_target_prob=math.exp(-initial_loss),
        target_prob=math.exp(-loss), value_shift_norm=float((value - start).norm()),
        update_norm=float("nan"),
        extras={"distance": math.nan if plan.distance is None else plan.distance},
    )  # fmt: skip


def _train_value(
    model: PreTrainedModel, ids: torch.Tensor, last: int, label: torch.Tensor,
    module: nn.Module, context: GraceContext, plan: Plan, config: GraceConfig,
) -> tuple[torch.Tensor, int, float]:  # fmt: skip
    """(trained value (d_out,), Adam steps, final NLL): the codebook with `plan` written in
    retrieves from the adaptor's input of `ids` (1, T), the trained row's value is learnt."""
    keys, values, radii, _ = upsert(context.tensors(), plan.tensors())
    row = plan.rows[plan.trained : plan.trained + 1]  # (1,)
    value = plan.values[plan.trained].detach().clone().requires_grad_(True)  # (d_out,)
    fixed: dict[str, torch.Tensor] = {}

    def candidate(inputs: torch.Tensor, own: torch.Tensor) -> torch.Tensor:
        if "rows" not in fixed:  # the adaptor's input cannot change between steps
            fixed["rows"] = retrieve(inputs, keys, radii)
        return substitute(own, fixed["rows"], values.index_put((row,), value[None]),
                          context.replacement)  # fmt: skip

    optimizer = torch.optim.Adam([value], lr=config.edit_lr)
    steps = 0
    with _adaptor_output(module, candidate):
        with torch.enable_grad():
            for _ in range(config.n_iter):
                optimizer.zero_grad(set_to_none=True)
                loss = _target_nll(model(input_ids=ids, use_cache=False).logits, last, label)
                if not loss.requires_grad:  # the trained row retrieves nowhere
                    break
                loss.backward()
                optimizer.step()
                steps += 1
        with torch.no_grad():
            final = float(_target_nll(model(input_ids=ids, use_cache=False).logits, last, label))
    return value.detach().clone(), steps, final


def _inner_params(value: Any) -> tuple[dict[str, Any], str]:
    """EasyEdit's `inner_params`, one parameter (`transformer.h[35].mlp.c_fc.weight`) ->
    `layer` and `role`."""
    given = value if isinstance(value, list) else [value]
    if len(given) != 1 or not isinstance(given[0], str):
        raise ValueError(f"GRACE edits one module: give one parameter name, got {value!r}")
    layer, role = layer_and_role(given[0])
    note = f"inner_params: {value} -> layer: {layer}, role: {role}"
    return {"layer": layer, "role": role}, note


def _rows(model: PreTrainedModel, config: GraceConfig, n: int) -> dict[str, torch.Tensor]:
    """Empty codebook rows of n entries at the adaptor, on the model's device (disk plans)."""
    module = names_for(model, config).module(config.role, config.layer)
    weight, transposed = module_weight(model, module)
    d_in, d_out = weight.shape if transposed else weight.shape[::-1]
    return footprint_rows(lambda shape, dtype: empty(model, shape, dtype), d_in, d_out, n)


def _step(model: PreTrainedModel, config: GraceConfig, _n: int) -> list[Update]:
    """One entry adding one row (a split writes two), with a typical info part."""
    rows = {"rows": empty(model, (1,), torch.long), **_rows(model, config, 1)}
    info = {"action": "add", "case_id": 10**6, "rows": [10**5], "distance": math.pi,
            "target_new": "x" * 16}  # fmt: skip
    return [MemoryEntry(tensors=rows, info=info)]


GRACE = EditMethod(
    name="grace",
    version="1",
    config_cls=GraceConfig,
    layers=lambda config: [],
    modules=lambda config, names, n_layers: [],
    uses_second_moment=lambda config: False,
    prepare=_prepare,
    edit=grace_edit,
    state=_state,
    load_state=_load_state,
    memory=MemoryHooks(install=_install, apply=_apply, size=lambda context: context.keys.shape[0]),
    footprint=Footprint(step=_step, state=_rows),  # the codebook: at most one row per edit
    hparams_import=HparamsImport(
        easyedit_alg="GRACE",
        renamed={"eps": "eps_init"},
        dropped={
            "val_reg": "read by no GRACE code (EasyEdit's or the original)",
            "reg": "read by no GRACE code (EasyEdit's or the original)",
            "dropout": "read by no GRACE code (EasyEdit's or the original)",
            "num_pert": "perturbation value training only, which seqedit refuses",
        },
        converted={"inner_params": _inner_params},
    ),
    quick_hparams={"layer": 0, "n_iter": 40, "edit_lr": 0.5, "eps_init": 0.1},
    testbed_hparams={"layer": 1, "eps_init": 1.0, "n_iter": 30, "edit_lr": 1.0},
)
