"""SERAC: an edit memory, a scope classifier and a counterfactual model (Mitchell et al.,
ICML 2022), on the memory-based contract: no weight of the base model changes.

An edit only stores itself in the memory (`EditMemory`: its prompt, for the classifier, and
"<prompt> <target_new><sep>", which the counterfactual model reads before a query). One
forward hook on the whole model then answers every query:
- the scope classifier (`serac_scope`) gives, at every position t of a row, the most likely
  edit j_t and its in-scope probability sigma_t; below `min_scope` it counts as 0 and the
  base model answers exactly;
- otherwise the counterfactual model reads edit j_t's prefix then the row, and
  * in scoring (a call without a KV cache) the output is the soft mixture
    log((1 - sigma_t) p_base + sigma_t p_cf), a proper causal LM;
  * in generation (a call with `use_cache=True`) it is a hard switch: p_cf where
    sigma_t > `generation_threshold`, p_base elsewhere. The hook keeps each row's tokens
    across cached steps; the classifier and the counterfactual model reread the whole row.
The memory accumulates over a campaign's edits (sequential editing keeps every edit).

The counterfactual model and the classifier come from `seqedit train serac` (`checkpoint:`).
Without one the classifier is untrained (seeded) and the counterfactual model is the base
model itself: what the every-method test runs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from pydantic import Field
from torch import nn
from torch.utils.hooks import RemovableHandle
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from seqedit.methods.config import MethodConfig
from seqedit.methods.keys_values import model_device
from seqedit.methods.method import (
    EASYEDIT_TRAINER_FIELDS,
    Derived,
    EditMethod,
    Footprint,
    HparamsImport,
    MemoryHooks,
    SequentialState,
    TrainedParts,
    empty,
)
from seqedit.methods.serac_scope import (
    EditMemory,
    ScopeClassifier,
    ScopeConfig,
    edit_prefix,
    separator_ids,
)
from seqedit.methods.updates import EditResult, MemoryEntry, Update
from seqedit.schemas.requests import EditRequest, spaced

_OUR_CLASSIFIER = (
    "seqedit's scope classifier is an embedding-similarity classifier over the base model's "
    "token embeddings (docs/methods.md, SERAC), not a separate encoder"
)


class SeracConfig(MethodConfig):
    """SERAC at edit time: the trained parts and how the classifier's output is used."""

    checkpoint: str | None = Field(
        default=None,
        description="The trained classifier and counterfactual model: a `seqedit train serac` "
        "output directory or its best/editor.pt. None: untrained (the base model answers).",
    )
    scope: ScopeConfig = Field(
        default_factory=ScopeConfig, description="The untrained classifier's shape."
    )
    min_scope: float = Field(
        default=1e-3,
        ge=0,
        lt=1,
        description="In-scope probabilities below this count as 0: the base model answers.",
    )
    generation_threshold: float = Field(
        default=0.5, gt=0, lt=1, description="Above it, generation takes the counterfactual model."
    )


@dataclass
class SeracContext:
    """Everything the hook reads: the trained parts, the memory and the generation rows."""

    classifier: ScopeClassifier
    counterfactual: PreTrainedModel
    embed: nn.Module
    separator: list[int]
    config: SeracConfig
    memory: EditMemory = field(default_factory=EditMemory)
    rows: list[list[int]] | None = None
    busy: bool = False


def counterfactual_model(trained: dict[str, Any], like: PreTrainedModel) -> PreTrainedModel:
    """The trained counterfactual model, on `like`'s device and dtype, in eval mode."""
    config = AutoConfig.for_model(**trained["counterfactual_config"])
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(trained["counterfactual"])
    for param in model.parameters():
        param.requires_grad_(False)
    return model.to(device=model_device(like), dtype=next(like.parameters()).dtype).eval()


def _prepare(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    config: SeracConfig,
    _second_moments: dict[int, torch.Tensor] | None,
    _derived: Derived | None = None,
    trained: dict[str, Any] | None = None,
    /,
) -> SeracContext:
    """The classifier and counterfactual model of `trained`, or the untrained ones."""
    embed = model.get_input_embeddings()
    d_model = int(embed.weight.shape[1])
    if trained is None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            classifier = ScopeClassifier(d_model, config.scope)
        counterfactual = model
    else:
        scope = ScopeConfig.model_validate(trained["network"])
        classifier = ScopeClassifier(d_model, scope)
        classifier.load_state_dict(trained["classifier"])
        counterfactual = counterfactual_model(trained, model)
    classifier = classifier.to(model_device(model)).eval()
    return SeracContext(classifier, counterfactual, embed, separator_ids(tokenizer), config)


def _valid_ids(ids: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """A row's real tokens (T_b,) and their positions (T_b,) given its attention mask."""
    positions = torch.arange(len(ids), device=ids.device) if mask is None else mask.nonzero()[:, 0]
    return ids[positions], positions


@torch.no_grad()
def _counterfactual_log_probs(
    context: SeracContext, prefix: torch.Tensor, row: torch.Tensor, last: int
) -> torch.Tensor:
    """Log-probabilities (last, V) of the counterfactual model at the last `last` positions
    of `row` (T,) read after an edit's `prefix` (P,). The hook stays out of this call (the
    counterfactual model may be the hooked base model itself)."""
    ids = torch.cat([prefix.to(row.device), row])[None]  # (1, P + T)
    busy, context.busy = context.busy, True
    try:
        logits = context.counterfactual(input_ids=ids, use_cache=False).logits[0, -last:]
    finally:
        context.busy = busy
    return torch.log_softmax(logits.float(), dim=-1)


def _mix_row(
    context: SeracContext, row: torch.Tensor, base: torch.Tensor, hard: bool
) -> torch.Tensor | None:
    """New outputs for the last len(base) positions of `row` (T,), or None where the base
    model answers alone. `base`: (K, V) base logits of those positions."""
    sigma, index = context.memory.scope(context.classifier, context.embed, row)
    keep = base.shape[0]
    sigma, index = sigma[-keep:], index[-keep:]
    threshold = context.config.generation_threshold if hard else context.config.min_scope
    active = sigma > threshold if hard else sigma >= threshold
    if not bool(active.any()):
        return None
    out = base.float().clone() if hard else torch.log_softmax(base.float(), dim=-1)
    for entry in index[active].unique().tolist():
        where = active & (index == entry)
        cf = _counterfactual_log_probs(context, context.memory.prefix_ids[entry], row, keep)
        if hard:
            out[where] = cf[where]
        else:
            s = sigma[where, None].clamp(max=1 - 1e-7)
            out[where] = torch.logaddexp(torch.log1p(-s) + out[where], torch.log(s) + cf[where])
    return out.to(base.dtype)


def _install(model: PreTrainedModel, context: SeracContext) -> RemovableHandle:
    """The hook answering every forward call of `model` from the memory (module doc)."""

    def hook(_module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> Any:
        if context.busy or len(context.memory) == 0:
            return None
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            return None
        mask = kwargs.get("attention_mask")
        past = kwargs.get("past_key_values", kwargs.get("cache"))
        generating = kwargs.get("use_cache") is True
        if generating:
            fresh = past is None or getattr(past, "get_seq_length", lambda: 1)() == 0
            if fresh or context.rows is None:
                context.rows = [
                    _valid_ids(ids[b], None if mask is None else mask[b])[0].tolist()
                    for b in range(ids.shape[0])
                ]
            else:
                for b, row in enumerate(context.rows):
                    row.extend(ids[b].tolist())
        logits = output.logits  # (B, K, V): the last K positions
        context.busy = True
        try:
            for b in range(ids.shape[0]):
                if generating and context.rows is not None:
                    row = torch.tensor(context.rows[b], device=ids.device)
                    mixed = _mix_row(context, row, logits[b, -1:], hard=True)
                    if mixed is not None:
                        logits[b, -1:] = mixed
                    continue
                row, positions = _valid_ids(ids[b], None if mask is None else mask[b])
                first = ids.shape[1] - logits.shape[1]  # input position of output 0
                kept = positions >= first
                mixed = _mix_row(context, row, logits[b, positions[kept] - first], hard=False)
                if mixed is not None:
                    logits[b, positions[kept] - first] = mixed
        finally:
            context.busy = False
        return output

    return model.register_forward_hook(hook, with_kwargs=True)


def _apply(context: SeracContext, entry: MemoryEntry) -> None:
    device = model_device(context.counterfactual)
    context.memory.add(
        entry.tensors["key_ids"].to(device),
        entry.tensors["prefix_ids"].to(device),
        context.classifier,
        context.embed,
    )


def serac_edit(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    request: EditRequest,
    config: SeracConfig,
    context: SeracContext,
) -> EditResult:
    """One SERAC edit: a `MemoryEntry` with the edit's key and prefix ids (memory untouched).

    loss: the counterfactual model's NLL of target_new after the prefix and the prompt;
    `extras["scope"]`: the classifier's in-scope probability of the prompt for this edit
    alone, at its last token.
    """
    device = model_device(model)
    key = list(tokenizer(request.filled_prompt, add_special_tokens=False)["input_ids"])
    target = list(tokenizer(spaced(request.target_new), add_special_tokens=False)["input_ids"])
    if not key or not target:
        raise ValueError(f"case {request.case_id}: empty tokenisation of prompt or target")
    key_ids = torch.tensor(key, dtype=torch.long, device=device)
    prefix_ids = torch.tensor(edit_prefix(tokenizer, request, context.separator), device=device)
    alone = EditMemory()
    alone.add(key_ids, prefix_ids, context.classifier, context.embed)
    sigma, _ = alone.scope(context.classifier, context.embed, key_ids)
    row = torch.tensor(key + target[:-1], device=device)
    log_probs = _counterfactual_log_probs(context, prefix_ids, row, len(target))
    nll = float(-log_probs.gather(1, torch.tensor(target, device=device)[:, None]).mean())
    entry = MemoryEntry(
        tensors={"key_ids": key_ids, "prefix_ids": prefix_ids},
        info={"case_id": request.case_id, "prompt": request.filled_prompt,
              "target_new": request.target_new},
    )  # fmt: skip
    return EditResult(
        updates=[entry], loss=nll, steps=0, key=torch.empty(0), value=torch.empty(0),
        target_prob=float(torch.exp(-torch.tensor(nll))), extras={"scope": float(sigma[-1])},
    )  # fmt: skip


def _state(context: SeracContext) -> SequentialState:
    return context.memory.state()


def _load_state(context: SeracContext, state: SequentialState) -> None:
    wanted = {"key_ids", "key_lengths", "prefix_ids", "prefix_lengths"}
    if set(state) != wanted:
        raise ValueError(f"a SERAC state holds {sorted(wanted)}, got {sorted(state)}")
    device = model_device(context.counterfactual)
    context.memory.load(
        {k: v.to(device) for k, v in state.items()}, context.classifier, context.embed
    )


def scope_hit_rate(
    context: SeracContext, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str]
) -> dict[str, float]:
    """Share of `prompts` (locality probes: out of every edit's scope) the classifier routes
    in scope (in-scope probability > generation_threshold at their last token)."""
    if not prompts or len(context.memory) == 0:
        return {"scope_hit_rate": 0.0}
    device = model_device(context.counterfactual)
    hits = 0
    for prompt in prompts:
        ids = torch.tensor(tokenizer(prompt, add_special_tokens=False)["input_ids"], device=device)
        sigma, _ = context.memory.scope(context.classifier, context.embed, ids)
        hits += int(float(sigma[-1]) > context.config.generation_threshold)
    return {"scope_hit_rate": hits / len(prompts)}


def _step(model: PreTrainedModel, _config: SeracConfig, _n: int) -> list[Update]:
    """One entry: a typical prompt (16 tokens) and prefix (24)."""
    tensors = {
        "key_ids": empty(model, (16,), torch.long),
        "prefix_ids": empty(model, (24,), torch.long),
    }
    info = {"case_id": 10**6, "prompt": "x" * 64, "target_new": "x" * 16}
    return [MemoryEntry(tensors=tensors, info=info)]


def _state_after(model: PreTrainedModel, _config: SeracConfig, edits: int) -> SequentialState:
    return {"key_ids": empty(model, (16 * edits,), torch.long),
            "key_lengths": empty(model, (edits,), torch.long),
            "prefix_ids": empty(model, (24 * edits,), torch.long),
            "prefix_lengths": empty(model, (edits,), torch.long)}  # fmt: skip


SERAC = EditMethod(
    name="serac",
    version="1",
    config_cls=SeracConfig,
    layers=lambda config: [],
    modules=lambda config, names, n_layers: [],
    uses_second_moment=lambda config: False,
    prepare=_prepare,
    edit=serac_edit,
    state=_state,
    load_state=_load_state,
    memory=MemoryHooks(
        install=_install,
        apply=_apply,
        size=lambda context: len(context.memory),
        probe=scope_hit_rate,
    ),
    footprint=Footprint(step=_step, state=_state_after, typical=True),
    trained=TrainedParts(
        checkpoint=lambda config: config.checkpoint,
        command="seqedit train serac --model DIR --train FILE --val FILE --out OUT",
        fields=("classifier", "counterfactual", "counterfactual_config", "network"),
        quick_training={
            "batch_size": 4,
            "max_steps": 40,
            "cf_lr": 3e-3,
            "swap_targets": 0.0,
            "scope": {"dim": 16},
        },
    ),
    hparams_import=HparamsImport(
        easyedit_alg="SERAC",
        dropped={
            "archive": "EasyEdit's own trained SERAC (a pickle seqedit does not read); train "
            "with `seqedit train serac` and give its directory as `checkpoint:`",
            "model_class": "the campaign's model directory says its class",
            "tokenizer_class": "the campaign's model directory holds its tokenizer",
            "tokenizer_name": "the campaign's model directory holds its tokenizer",
            "small_name": "the counterfactual model is trained with the parts: "
            "`counterfactual:` of `seqedit train serac --config`",
            "cls_name": _OUR_CLASSIFIER,
            "cls_class": _OUR_CLASSIFIER,
            "cross_attend": _OUR_CLASSIFIER,
            "cos": _OUR_CLASSIFIER,
            "square": _OUR_CLASSIFIER,
            "bound_embeds": _OUR_CLASSIFIER,
            "dist_heads": _OUR_CLASSIFIER,
            "soft_weighting": "seqedit scores with the soft mixture and generates with the hard "
            "switch (docs/methods.md, SERAC)",
            "edit_lr": "read by no SERAC code at edit time (EasyEdit's trainer field)",
            "use_all_negatives": "seqedit's classifier trains on each request's neighbourhood "
            "prompts and the other requests of the batch",
            "unlikelihood": "seqedit's counterfactual model trains on the target's NLL only",
        },
        fixed={
            "inner_params": [],
            "train_base": False,
            "dropout": 0.0,
            "supervised": False,
            "no_grad_layers": None,
            "freeze": None,
            "freeze_cntr": False,
            "checkpoint_grad": False,
            "lora": None,
        },
        training=EASYEDIT_TRAINER_FIELDS,
        training_renamed={
            "lr": "lr, cf_lr",
            "cedit": "loss.c_edit",
            "cloc": "loss.c_scope",
            "small_name": "counterfactual",
        },
    ),
    quick_hparams={"scope": {"dim": 16}},
)
