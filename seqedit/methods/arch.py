"""Architecture module names: where the editable modules live in each model family.

Every editing method addresses modules by dotted name templates with one `{}` for the
layer index (the convention of the reference code). Any `nn.Linear` or `Conv1D` of a block
can be edited, named by its role (`ROLES`: attention q/k/v/out or fused qkv, MLP in/gate/
out); `module_names` in a method's hparams is the escape hatch for other architectures.
Adding an architecture is one entry in `_NAMES`.
"""

from __future__ import annotations

import re

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

ROLES = ("attn_qkv", "attn_q", "attn_k", "attn_v", "attn_out", "mlp_in", "mlp_gate", "mlp_out")
"""Roles of the linear maps of a block: attention (fused qkv or q/k/v, output projection)
and MLP (input, gate, output = the rewrite module)."""


class ModuleNames(BaseModel):
    """Dotted module names (templates take the layer index) of one model family."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    rewrite_module_tmp: str = Field(
        description="The edited linear map, the MLP output projection "
        "(e.g. 'transformer.h.{}.mlp.c_proj')."
    )
    layer_module_tmp: str = Field(
        description="A whole transformer block (its output is the residual)."
    )
    mlp_module_tmp: str = Field(
        description="The MLP of a block (its output is the rewrite module's output)."
    )
    attn_module_tmp: str = Field(description="The attention of a block.")
    ln_f_module: str = Field(description="The final layer norm before the LM head.")
    lm_head_module: str = Field(description="The module mapping hidden states to logits.")
    rewrite_weight_transposed: bool = Field(
        description="True when the rewrite weight is stored (d_in, d_out), as GPT-2's Conv1D does; "
        "False for nn.Linear storage (d_out, d_in)."
    )
    roles: dict[str, str] = Field(
        default_factory=dict,
        description="Role -> module name template of the other linear maps of a block "
        f"(roles: {', '.join(ROLES)}); 'mlp_out' is `rewrite_module_tmp`.",
    )

    def module(self, role: str, layer: int) -> str:
        """The dotted name of the module playing `role` in block `layer`."""
        if role == "mlp_out":
            return self.rewrite_module_tmp.format(layer)
        if role not in self.roles:
            known = ", ".join(["mlp_out", *sorted(self.roles)])
            raise LookupError(
                f"no module for role {role!r} in this architecture (known here: {known}); "
                "give its template in `module_names.roles`"
            )
        return self.roles[role].format(layer)


def _decoder(
    prefix: str,
    mlp_out: str,
    attn: str,
    ln_f: str,
    roles: dict[str, str],
    lm_head: str = "lm_head",
) -> ModuleNames:
    return ModuleNames(
        rewrite_module_tmp=f"{prefix}.{{}}.mlp.{mlp_out}",
        layer_module_tmp=f"{prefix}.{{}}",
        mlp_module_tmp=f"{prefix}.{{}}.mlp",
        attn_module_tmp=f"{prefix}.{{}}.{attn}",
        ln_f_module=ln_f,
        lm_head_module=lm_head,
        rewrite_weight_transposed=False,
        roles={role: f"{prefix}.{{}}.{path}" for role, path in roles.items()},
    )


_QKV_SPLIT = {"attn_q": "q_proj", "attn_k": "k_proj", "attn_v": "v_proj"}
_LLAMA_LIKE = _decoder(
    "model.layers", "down_proj", "self_attn", "model.norm",
    {**{r: f"self_attn.{n}" for r, n in _QKV_SPLIT.items()}, "attn_out": "self_attn.o_proj",
     "mlp_in": "mlp.up_proj", "mlp_gate": "mlp.gate_proj"},
)  # fmt: skip

_NAMES: dict[str, ModuleNames] = {
    "gpt2": _decoder(
        "transformer.h",
        "c_proj",
        "attn",
        "transformer.ln_f",
        {"attn_qkv": "attn.c_attn", "attn_out": "attn.c_proj", "mlp_in": "mlp.c_fc"},
    ).model_copy(update={"rewrite_weight_transposed": True}),
    "gptj": _decoder(
        "transformer.h",
        "fc_out",
        "attn",
        "transformer.ln_f",
        {
            **{r: f"attn.{n}" for r, n in _QKV_SPLIT.items()},
            "attn_out": "attn.out_proj",
            "mlp_in": "mlp.fc_in",
        },
    ),
    "gpt_neox": _decoder(
        "gpt_neox.layers",
        "dense_4h_to_h",
        "attention",
        "gpt_neox.final_layer_norm",
        {
            "attn_qkv": "attention.query_key_value",
            "attn_out": "attention.dense",
            "mlp_in": "mlp.dense_h_to_4h",
        },
    ),
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
}


def supported_model_types() -> list[str]:
    """The `config.model_type` values `module_names_for` knows."""
    return sorted(_NAMES)


def module_names_for(model: nn.Module) -> ModuleNames:
    """The module names of `model`, chosen by `model.config.model_type`."""
    config = getattr(model, "config", None)
    return module_names_for_type(getattr(config, "model_type", None))


def module_names_for_type(model_type: str | None) -> ModuleNames:
    """The module names of a model family by its `config.model_type` ("gpt2", "llama"...)."""
    if model_type not in _NAMES:
        raise ValueError(
            f"no module names for model_type={model_type!r}; supported: "
            f"{', '.join(supported_model_types())}. For another architecture, give the module "
            "names by hand in the method's hparams: `module_names: {rewrite_module_tmp: "
            "'model.layers.{}.mlp.down_proj', layer_module_tmp: ..., mlp_module_tmp: ..., "
            "attn_module_tmp: ..., ln_f_module: ..., lm_head_module: ..., "
            "rewrite_weight_transposed: false}` (or add an entry to seqedit/methods/arch.py)"
        )
    return _NAMES[model_type]


def get_module(model: nn.Module, name: str) -> nn.Module:
    """The submodule at dotted `name`, with an error that says what exists instead."""
    try:
        return model.get_submodule(name)
    except AttributeError as exc:
        parent = name.rsplit(".", 1)[0] if "." in name else ""
        try:
            children = [n for n, _ in model.get_submodule(parent).named_children()]
        except AttributeError:
            children = []
        raise LookupError(
            f"model {type(model).__name__} has no module {name!r}"
            + (f"; children of {parent!r}: {children}" if children else "")
        ) from exc


def rewrite_weight(model: nn.Module, names: ModuleNames, layer: int) -> nn.Parameter:
    """The stored weight of the rewrite module at `layer`.

    Shape (d_in, d_out) when `names.rewrite_weight_transposed`, else (d_out, d_in).
    """
    module = get_module(model, names.rewrite_module_tmp.format(layer))
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor):
        raise LookupError(f"module {names.rewrite_module_tmp.format(layer)!r} has no weight tensor")
    return weight  # type: ignore[return-value]


def module_weight(
    model: nn.Module, name: str, default_transposed: bool | None = None
) -> tuple[torch.Tensor, bool]:
    """The stored weight of the linear map `name` and whether its storage is transposed:
    (d_in, d_out) for GPT-2's Conv1D (y = x @ W), (d_out, d_in) for `nn.Linear`; another
    module type takes `default_transposed` (module names given by hand), else is refused."""
    module = get_module(model, name)
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise LookupError(f"module {name!r} ({type(module).__name__}) has no 2-D weight to edit")
    if isinstance(module, nn.Linear):
        return weight, False
    if type(module).__name__ == "Conv1D":  # transformers.pytorch_utils.Conv1D
        return weight, True
    if default_transposed is not None:
        return weight, default_transposed
    raise LookupError(
        f"module {name!r} is a {type(module).__name__}; seqedit edits nn.Linear and Conv1D"
    )


def rewrite_dims(model: nn.Module, names: ModuleNames, layer: int) -> tuple[int, int]:
    """(d_in, d_out) of the rewrite module at `layer`, whatever its storage layout."""
    rows, cols = rewrite_weight(model, names, layer).shape
    return (rows, cols) if names.rewrite_weight_transposed else (cols, rows)


def layer_and_role(parameter: str) -> tuple[int, str]:
    """(layer, role) of a block module named as the reference hparams files do
    (`transformer.h[35].mlp.c_fc.weight`, `model.layers.27.mlp.down_proj`), by the module
    names of the families seqedit knows: the inverse of `ModuleNames.module`."""
    module = re.sub(r"\[(\d+)\]", r".\1", parameter).removesuffix(".weight")
    for layer in map(int, re.findall(r"\.(\d+)\.", module)):
        for family in supported_model_types():
            names = _NAMES[family]
            for role in ("mlp_out", *names.roles):
                if names.module(role, layer) == module:
                    return layer, role
    raise ValueError(
        f"{module!r} is no block module of {', '.join(supported_model_types())}; "
        "give `layer` and `role` instead"
    )


def role_of_module(name: str) -> str:
    """The role of a block module given by its last name part(s), as peft's `target_modules`
    names them (`c_attn`, `q_proj`, `attn.c_proj`), in the families seqedit knows; an
    ambiguous name (`c_proj`: GPT-2's attention and MLP output) must give more parts."""
    found: dict[str, set[str]] = {}
    for family in supported_model_types():
        names = _NAMES[family]
        for role in ("mlp_out", *names.roles):
            path = names.module(role, 0).split(".0.", 1)[1]
            if path == name or path.endswith("." + name):
                found.setdefault(role, set()).add(f"{family} {path}")
    if len(found) == 1:
        return next(iter(found))
    if not found:
        raise ValueError(
            f"{name!r} names no block module of {', '.join(supported_model_types())}; "
            "give `roles` instead"
        )
    seen = "; ".join(f"{role}: {', '.join(sorted(where))}" for role, where in sorted(found.items()))
    raise ValueError(f"{name!r} is ambiguous ({seen}); give more of the name, or `roles`")
