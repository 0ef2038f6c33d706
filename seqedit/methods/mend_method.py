"""`method: mend` in a campaign: edits with a MEND network trained by `seqedit train mend`.

Each edit runs the edit example (the rewrite prompt + target_new) through the model once,
takes every edited map's per-token inputs u and output gradients delta (`token_factors`),
and the trained network turns them into one `LowRankDelta` per map (`mend.MendEditor`):
dW = -lr_m * delta~^T u~, rank = the example's token count. The network itself comes from
the checkpoint `checkpoint:` names (a training directory, or its `best/editor.pt`), which the
editor worker reads and checks (`TrainedParts`). Without a checkpoint the network is the
identity-initialised, untrained one: one plain gradient step of the target's NLL times
`network.edit_lr` on each map.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from pydantic import Field
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from seqedit.methods.arch import ModuleNames
from seqedit.methods.config import MethodConfig, names_for
from seqedit.methods.keys_values import model_device
from seqedit.methods.mend import (
    MendEditor,
    MendNetworkConfig,
    default_mend_modules,
    mend_updates_and_nll,
    weight_shapes,
)
from seqedit.methods.method import (
    EASYEDIT_TRAINER_FIELDS,
    Derived,
    EditMethod,
    Footprint,
    HparamsImport,
    TrainedParts,
    edited_shapes,
    empty,
    parameter_module,
)
from seqedit.methods.updates import EditResult, LowRankDelta, Update
from seqedit.schemas.requests import EditRequest


class MendConfig(MethodConfig):
    """MEND at edit time: the trained network and the maps it edits."""

    checkpoint: str | None = Field(
        default=None,
        description="The trained network: a `seqedit train mend` output directory or its "
        "best/editor.pt. None: the untrained network (a gradient step times edit_lr).",
    )
    modules: list[str] | None = Field(
        default=None,
        min_length=1,
        description="Edited maps (dotted names), as trained; None: MLP in/out of the last "
        "`last_blocks` blocks (the training default).",
    )
    last_blocks: int = Field(default=3, ge=1, description="Blocks edited when `modules` is None.")
    network: MendNetworkConfig = Field(
        default_factory=MendNetworkConfig,
        description="The untrained network's shape and edit_lr (a checkpoint has its own).",
    )
    example_tokens: int = Field(
        default=32,
        ge=1,
        description="Tokens of an edit example assumed by `seqedit validate`'s disk estimate "
        "(an update's rank is the example's token count).",
    )


@dataclass
class MendContext:
    """The network every edit of the campaign runs (eval mode, on the model's device)."""

    editor: MendEditor


def _modules(config: MendConfig, names: ModuleNames, n_layers: int) -> list[str]:
    return list(config.modules or default_mend_modules(names, n_layers, config.last_blocks))


def _prepare(
    model: PreTrainedModel,
    _tokenizer: PreTrainedTokenizerBase,
    config: MendConfig,
    _second_moments: dict[int, torch.Tensor] | None,
    _derived: Derived | None = None,
    trained: dict[str, Any] | None = None,
    /,
) -> MendContext:
    """The trained network of `trained` (the checkpoint's contents), checked against the
    maps this config edits; or, with none, the untrained network of `config.network`."""
    names = names_for(model, config)
    modules = _modules(config, names, model.config.num_hidden_layers)
    shapes = weight_shapes(model, modules, names.rewrite_weight_transposed)
    if trained is None:
        editor = MendEditor(modules, shapes, config.network)
    else:
        source = trained.get("source", "the checkpoint")
        if list(trained["modules"]) != modules:
            raise ValueError(
                f"{source}: field modules: trained for {list(trained['modules'])}, but this "
                f"config edits {modules} (set `modules:` or `last_blocks:` as in training)"
            )
        saved = [tuple(shape) for shape in trained["shapes"]]
        if saved != [tuple(shape) for shape in shapes]:
            raise ValueError(f"{source}: field shapes: trained on {saved}, this model has {shapes}")
        network = MendNetworkConfig.model_validate(trained["network"])
        editor = MendEditor(modules, shapes, network)
        editor.load_state_dict(trained["editor"])
    editor.to(model_device(model)).eval()
    for param in editor.parameters():
        param.requires_grad_(False)
    return MendContext(editor)


def mend_edit(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    request: EditRequest,
    config: MendConfig,
    context: MendContext,
) -> EditResult:
    """One MEND edit: the update of every edited map (model unchanged). `loss` is the
    target's NLL before the edit (MEND optimises nothing at edit time: `steps` is 0)."""
    updates, nll = mend_updates_and_nll(model, tokenizer, request, context.editor)
    return EditResult(
        updates=list(updates),
        loss=nll,
        steps=0,
        key=torch.empty(0),
        value=torch.empty(0),
        initial_loss=nll,
        initial_target_prob=math.exp(-nll),
        update_norm=math.sqrt(sum(d.norm() ** 2 for d in updates)),
        extras={"rank": float(updates[0].rank)},
    )


def _inner_params(value: Any) -> tuple[dict[str, Any], str]:
    """EasyEdit's `inner_params` (parameter names) -> `modules` (their modules)."""
    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
        raise ValueError(f"a list of parameter names, got {value!r}")
    modules = list(dict.fromkeys(parameter_module(name) for name in value))
    return {"modules": modules}, f"inner_params: {len(value)} parameters -> modules: {modules}"


def _network_field(source: str, ours: str) -> Callable[[Any], tuple[dict[str, Any], str]]:
    """A field of the network's shape, given flat in EasyEdit's file, -> `network.<ours>`."""

    def convert(value: Any) -> tuple[dict[str, Any], str]:
        return {"network": {ours: value}}, f"{source}: {value} -> network.{ours}"

    return convert


def _step(model: PreTrainedModel, config: MendConfig, n: int) -> list[Update]:
    """Per edited map, float32 factors left (d_out, T) and right (d_in, T) per request,
    T = `example_tokens`."""
    rank = n * config.example_tokens
    shapes = edited_shapes(model, config, _modules)
    return [
        LowRankDelta(
            name, empty(model, (out, rank), torch.float32), empty(model, (inp, rank), torch.float32)
        )
        for name, (out, inp) in shapes.items()
    ]


MEND = EditMethod(
    name="mend",
    version="1",
    config_cls=MendConfig,
    layers=lambda config: [],
    modules=_modules,
    uses_second_moment=lambda config: False,
    prepare=_prepare,
    edit=mend_edit,
    footprint=Footprint(step=_step, typical=True),
    trained=TrainedParts(checkpoint=lambda config: config.checkpoint, command="seqedit train mend"),
    hparams_import=HparamsImport(
        easyedit_alg="MEND",
        converted={
            "inner_params": _inner_params,
            "rank": _network_field("rank", "rank"),
            "n_hidden": _network_field("n_hidden", "n_hidden"),
            "edit_lr": _network_field("edit_lr", "edit_lr"),
            "norm": _network_field("norm", "standardise"),
        },
        dropped={
            "archive": "EasyEdit's own trained MEND (a pickle seqedit does not read); train "
            "with `seqedit train mend` and give its directory as `checkpoint:`",
            "alg": "names the method, as `alg_name` does",
            "model_class": "the campaign's model directory says its class",
            "tokenizer_class": "the campaign's model directory holds its tokenizer",
            "tokenizer_name": "the campaign's model directory holds its tokenizer",
        },
        fixed={
            "init": "id",
            "act": "relu",
            "mlp_class": "IDMLP",
            "shared": True,
            "combine": True,
            "one_sided": False,
            "x_only": False,
            "delta_only": False,
            "train_base": False,
            "dropout": 0.0,
            "hidden_dim": None,
            "no_grad_layers": None,
            "lr_scale": 1.0,
        },
        training=EASYEDIT_TRAINER_FIELDS,
        training_renamed={
            "lr": "lr",
            "lr_lr": "lr_lr",
            "cedit": "loss.c_edit",
            "cloc": "loss.c_loc",
            "rank": "network.rank",
            "n_hidden": "network.n_hidden",
            "edit_lr": "network.edit_lr",
            "norm": "network.standardise",
            "inner_params": "modules",
        },
    ),
    quick_hparams={"last_blocks": 1, "network": {"rank": 4, "edit_lr": 1e-2}},
    testbed_hparams={"last_blocks": 2, "network": {"rank": 8, "edit_lr": 1e-2}},
)
