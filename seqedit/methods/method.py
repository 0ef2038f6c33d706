"""What the editor needs to know about an editing method, in one small record.

A method module defines its pydantic config and one `EditMethod` value; the registry lists
them. No inheritance: the editor calls the functions held here.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from pydantic import BaseModel
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from seqedit.methods.arch import ModuleNames, module_names_for, module_weight
from seqedit.methods.updates import EditResult, LowRankDelta, MemoryEntry, Update
from seqedit.schemas.requests import EditRequest

Derived = dict[int, dict[str, torch.Tensor]]
"""layer -> named tensors computed from that layer's second moment alone (e.g. C^-1)."""


class Prepare(Protocol):
    """(model, tokenizer, config, second moments by layer or None, derived tensors or None)
    -> the per-campaign context. `derived` (from `EditMethod.derive`, possibly loaded from a
    cache) replaces recomputing them; without it `prepare` computes them itself. A method
    with `EditMethod.trained` also gets, sixth, the trained checkpoint's contents (or None:
    its config names none)."""

    def __call__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        config: Any,
        second_moments: dict[int, torch.Tensor] | None,
        derived: Derived | None = None,
        /,
    ) -> Any: ...


@dataclass(frozen=True)
class TrainedParts:
    """A method that edits with parts trained beforehand (`seqedit train <method>`): the
    editor worker reads the checkpoint its config names (tensors and plain values only,
    checked against the model it was trained on) and hands the contents to `prepare`.

    Attributes:
        checkpoint: config -> the checkpoint path it names (a training directory or its
            `best/editor.pt`), or None for the method's untrained form.
        command: how a user makes one, for error messages.
        fields: the keys the checkpoint file must hold (checked when it is read).
        quick_training: a short training config on the tests' tiny testbed whose checkpoint
            the every-method test edits with; None: the untrained form edits (MEND's is a
            gradient step; SERAC's untrained counterfactual model does not answer edits).
    """

    checkpoint: Callable[[Any], str | None]
    command: str
    fields: tuple[str, ...] = ("editor", "modules", "shapes", "network")
    quick_training: Mapping[str, Any] | None = None


Derive = Callable[[Any, torch.Tensor], dict[str, torch.Tensor]]
"""(config, one layer's second moment C (d_in, d_in)) -> tensors derived from C alone."""

Edit = Callable[[PreTrainedModel, PreTrainedTokenizerBase, EditRequest, Any, Any], EditResult]
"""(model, tokenizer, request, config, context) -> the deltas of one edit (model untouched)."""


BatchEdit = Callable[
    [PreTrainedModel, PreTrainedTokenizerBase, list[EditRequest], Any, Any], EditResult
]
"""(model, tokenizer, requests, config, context) -> the deltas of one batch of edits."""


SequentialState = dict[str, torch.Tensor]
"""What a method carries from one edit to the next, by name (e.g. AlphaEdit's "cache_c.5")."""


def no_state(_context: Any) -> SequentialState:
    """The sequential state of a method that carries none."""
    return {}


def load_no_state(_context: Any, state: SequentialState) -> None:
    """Restore the (empty) state of a stateless method; anything else is a mistake."""
    if state:
        raise ValueError(f"this method carries no sequential state, got {sorted(state)}")


def one_at_a_time(batch: BatchEdit) -> Edit:
    """The `Edit` of a batched method: a batch of one, with key and value of that request.

    The batch result holds keys (n, d_in) and values (n, d); the single edit's are row 0.
    """

    def edit(
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        request: EditRequest,
        config: Any,
        context: Any,
    ) -> EditResult:
        result = batch(model, tokenizer, [request], config, context)
        result.key, result.value = result.key[0], result.value[0]
        return result

    return edit


class RemovableHandle(Protocol):
    """What `register_forward_hook` returns."""

    def remove(self) -> None: ...


@dataclass(frozen=True)
class MemoryHooks:
    """How a memory-based method (GRACE) changes the model's outputs without changing weights.

    Its memory lives in the per-campaign context (`prepare`'s result); `EditMethod.state`
    returns it as tensors (checkpointed and counted in the weights fingerprint) and
    `load_state` puts it back. An edit returns `MemoryEntry`s and leaves the memory alone.

    Attributes:
        install: (model, context) -> handle: the one forward hook through which the memory
            changes outputs. The editor's scoring and every evaluator install it the same way.
        apply: (context, entry) -> None: add one logged entry to the memory (after an edit,
            and when an evaluator or `seqedit rebuild` replays the edit log).
        size: (context) -> entries in the memory (recorded instead of update norms).
        probe: (context, tokenizer, locality probe prompts) -> health metrics of the memory
            on prompts outside every edit's scope (SERAC: `scope_hit_rate`); None: none.
    """

    install: Callable[[PreTrainedModel, Any], RemovableHandle]
    apply: Callable[[Any, MemoryEntry], None]
    size: Callable[[Any], int]
    probe: Callable[[Any, PreTrainedTokenizerBase, Sequence[str]], dict[str, float]] | None = None


SourceConversion = Callable[[Any], tuple[dict[str, Any], str]]
"""A source field's value -> (our fields and their values, a note saying what was done);
raises ValueError (with the reason) for a value it cannot convert."""


@dataclass(frozen=True)
class HparamsImport:
    """How `seqedit hparams import` reads this method's hyperparameter files of EasyEdit and
    of the reference code (docs/hparams.md). Fields every method drops (`device`,
    `stats_dir`, ...) and the module-name fields are the importer's; these are the method's.

    Attributes:
        easyedit_alg: EasyEdit's `alg_name` of this method (None: EasyEdit has none).
        selector: (source field, value) picking this method among those sharing
            `easyedit_alg` (FT-L and FT-M: `objective_optimization`); None: the name tells.
        path_names: names of this method in the path of a reference file (its directory,
            or a part of the file name split at `_` and `.`), matched case-insensitively.
        renamed: source field -> our field, where the names differ.
        dropped: source field -> why it is dropped.
        null_only: fields of `dropped` accepted only when null (another value is refused).
        false_means: our field -> its value where a source writes `false` (no clamp: null).
        converted: source field -> how its value becomes our fields (GRACE's `inner_params`,
            a parameter name, becomes `layer` and `role`).
        one_layer_hint: added to the error when a file lists several layers for a `layer`.
        fixed: source field -> the only value seqedit's method implements (MEND's
            `act: relu`); that value is dropped with a note, another one is refused.
        training: source fields that configure training, not editing (`seqedit train`);
            dropped from the edit hparams with that reason.
        training_renamed: source field -> the dotted field(s) of our training config it
            becomes (`hparams import --training`; several separated by commas).
    """

    easyedit_alg: str | None = None
    selector: tuple[str, str] | None = None
    path_names: tuple[str, ...] = ()
    renamed: Mapping[str, str] = field(default_factory=dict)
    dropped: Mapping[str, str] = field(default_factory=dict)
    null_only: tuple[str, ...] = ()
    false_means: Mapping[str, Any] = field(default_factory=dict)
    converted: Mapping[str, SourceConversion] = field(default_factory=dict)
    one_layer_hint: str = ""
    fixed: Mapping[str, Any] = field(default_factory=dict)
    training: tuple[str, ...] = ()
    training_renamed: Mapping[str, str] = field(default_factory=dict)


EASYEDIT_TRAINER_FIELDS: tuple[str, ...] = (
    "lr", "lr_lr", "seed", "cedit", "cloc", "cbase", "model_save_pt",
    "silent", "max_epochs", "max_iters", "log_interval", "eval_log_interval", "final_eval",
    "val_interval", "early_stop_patience", "early_stop_key", "eval_only", "half", "debug",
    "save", "verbose", "val_batch_size", "accumulate_bs", "val_steps", "opt", "grad_clip",
    "results_dir", "log_errors", "edit_bs",
)  # fmt: skip
"""EasyEdit's trainer fields (MEND, SERAC yamls): training, not editing
(`HparamsImport.training`)."""


def parameter_module(name: str) -> str:
    """A parameter name of EasyEdit's `inner_params` -> its module's dotted name
    (`transformer.h[45].mlp.c_proj.weight` -> `transformer.h.45.mlp.c_proj`)."""
    dotted = name.replace("[", ".").replace("]", "")
    return dotted.removesuffix(".weight").removesuffix(".bias")


StepUpdates = Callable[[PreTrainedModel, Any, int], list[Update]]
"""(model, config, requests in one step) -> the updates one step logs, as `torch.empty`
tensors of their real shapes and dtypes on the model's device: the meta device for an
estimate (no weights loaded, no memory used)."""

StateAfter = Callable[[PreTrainedModel, Any, int], SequentialState]
"""(model, config, edits applied) -> the sequential state `EditMethod.state` holds by then
(its largest, where it depends on the edits), as `torch.empty` tensors like `StepUpdates`."""


def no_state_after(_model: PreTrainedModel, _config: Any, _edits: int) -> SequentialState:
    """The state footprint of a method that carries none."""
    return {}


@dataclass(frozen=True)
class Footprint:
    """What a method writes to disk, by shape and dtype: `seqedit validate` estimates a
    campaign's edit log and checkpoints from it on a model built on the meta device.

    Attributes:
        step: what one edit step logs (`StepUpdates`).
        state: the sequential state checkpointed after some edits (`StateAfter`).
        typical: the shapes are typical, not exact: they depend on the data (MEND's rank is
            an edit example's token count; a memory's label width, its target's).
    """

    step: StepUpdates
    state: StateAfter = no_state_after
    typical: bool = False


NetUpdate = Callable[[Any, list[list[Update]]], list[Update]]
"""(config, the updates of steps 0..t in order) -> updates with the same total weight change
in fewer factors than stacking them all (a continued LoRA adapter: its last factors)."""

Modules = Callable[[Any, ModuleNames, int], list[str]]
"""(config, the model's module names, its number of blocks) -> the dotted names of the
linear maps it edits (the block count resolves "every block", as LoRA's `layers: []`)."""


def low_rank_step(modules: Modules, dtype: torch.dtype) -> StepUpdates:
    """The `StepUpdates` of a method logging, per module of `modules`, left (d_out, n) and
    right (d_in, n) factors in `dtype` for a step of n requests (ROME, MEMIT, AlphaEdit)."""

    def step(model: PreTrainedModel, config: Any, n: int) -> list[Update]:
        return [
            LowRankDelta(name, empty(model, (d_out, n), dtype), empty(model, (d_in, n), dtype))
            for name, (d_out, d_in) in edited_shapes(model, config, modules).items()
        ]

    return step


def edited_shapes(
    model: PreTrainedModel, config: Any, modules: Modules
) -> dict[str, tuple[int, int]]:
    """Module of `modules` -> (d_out, d_in) of its weight in the math convention."""
    names = config.module_names or module_names_for(model)
    shapes = {}
    for module in modules(config, names, model.config.num_hidden_layers):
        weight, transposed = module_weight(model, module, names.rewrite_weight_transposed)
        rows, cols = weight.shape
        shapes[module] = (int(cols), int(rows)) if transposed else (int(rows), int(cols))
    return shapes


def empty(model: PreTrainedModel, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised tensor on the device of `model`'s parameters (meta: no memory)."""
    return torch.empty(shape, dtype=dtype, device=next(model.parameters()).device)


@dataclass(frozen=True)
class EditMethod:
    """One registered editing method.

    Attributes:
        name: registry key ("rome").
        version: bumped whenever the math changes; recorded in every edit row.
        config_cls: pydantic config (extra="forbid") validated from the campaign's hparams.
        layers: the layers of the rewrite module a config is about; when it
            `uses_second_moment`, covariance statistics are built and loaded for these.
        modules: (config, the model's module names, its number of blocks) -> the dotted
            names of the linear maps (`nn.Linear` / `Conv1D`) whose weights a config edits;
            [] for memory methods. Call it through `modules_in`.
        uses_second_moment: whether a config needs covariance statistics.
        prepare: work done once per campaign (context templates, inverse covariances).
        edit: compute the deltas of one request.
        edit_batch: compute the deltas of several requests as one step (None: one at a time).
        state: the sequential state in a context (copies), for checkpoints.
        load_state: put a saved sequential state back into a context.
        derive: expensive per-layer tensors that depend only on C and the config fields
            named by `derive_key` (inverse covariance, null-space basis); the editor caches
            them next to the stats and hands them to `prepare`. None: nothing to cache.
        derive_key: the config fields `derive` reads (part of the cache key).
        memory: for memory-based methods, how their side state changes outputs.
        footprint: what it writes to disk, by shape and dtype (edit log, checkpoints);
            None: `seqedit validate` makes no disk estimate for it.
        hparams_import: how its EasyEdit / reference hparams files read (None: not at all).
        trained: for methods with trained parts (MEND), where they are (`TrainedParts`).
        net_update: the total change of many steps in fewer factors (`NetUpdate`), used by
            `seqedit export --format peft`; None: the steps' factors side by side.
        quick_hparams: a fast, valid config for the tests' tiny testbed (layer 0 of a
            4-layer, 64-wide GPT-2 with covariance stats of layer 0); a test edits with it.
        testbed_hparams: hparams tuned on the synthetic-300 testbed of the demo and the
            benchmarks (docs/methods.md, "Tuning on a small model"; stats of layers 0-3).
    """

    name: str
    version: str
    config_cls: type[BaseModel]
    layers: Callable[[Any], list[int]]
    modules: Modules
    uses_second_moment: Callable[[Any], bool]
    prepare: Prepare
    edit: Edit
    edit_batch: BatchEdit | None = None
    state: Callable[[Any], SequentialState] = no_state
    load_state: Callable[[Any, SequentialState], None] = load_no_state
    derive: Derive | None = None
    derive_key: Callable[[Any], dict[str, Any]] = lambda _config: {}
    memory: MemoryHooks | None = None
    footprint: Footprint | None = None
    hparams_import: HparamsImport | None = None
    net_update: NetUpdate | None = None
    trained: TrainedParts | None = None
    quick_hparams: Mapping[str, Any] = field(default_factory=dict)
    testbed_hparams: Mapping[str, Any] = field(default_factory=dict)

    def modules_in(self, model: PreTrainedModel, config: Any, names: ModuleNames) -> list[str]:
        """The dotted names of the linear maps `config` edits in `model`."""
        return self.modules(config, names, model.config.num_hidden_layers)

    @property
    def batched(self) -> bool:
        """Whether the method edits several requests as one step (`edit_batch`)."""
        return self.edit_batch is not None


def rewrite_modules(layers: list[int], names: ModuleNames) -> list[str]:
    """The rewrite module (MLP output projection) of each of `layers`."""
    return [names.rewrite_module_tmp.format(layer) for layer in layers]


def jsonable(value: Any) -> Any:
    """A JSON-safe view of a method context: tensors become their shape and dtype."""
    if isinstance(value, torch.Tensor):
        return {"tensor": list(value.shape), "dtype": str(value.dtype).removeprefix("torch.")}
    if hasattr(value, "_asdict"):  # NamedTuple
        return jsonable(value._asdict())
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    if value is None or isinstance(value, str | int | float | bool):
        return value
    return repr(value)


_WEIGHT, _STATE, _RNG = "weight.", "state.", "rng_state"
