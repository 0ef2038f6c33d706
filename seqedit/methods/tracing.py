"""Causal tracing (ROME, Meng et al. 2022, section 2): which layers recall a fact.

For a fact the model knows (its greedy next token after the prompt is the first token of
`spaced(target_true)`), every pass is scored by P(that token) at the last position:
clean (`p_clean`); corrupted, Gaussian noise on the subject tokens' input embeddings, in
`samples` copies whose mean is `p_corrupt` (the same noise for every pass of a record);
restored, corrupted but with some module outputs at one token set back to their clean
values, whose indirect effect is `p_restored - p_corrupt`.

At (token t, layer l), "hidden" restores the output of block l (the residual stream);
"mlp" and "attn" restore the MLP or attention outputs of the layers
`[l - w//2, l + w - w//2)`, clipped (the reference's window), with w = min(window,
n_layer): on a model shallower than the window every centre would restore every layer.

Per record the (T, L) effects become the rows of `ROW_LABELS` (several tokens: their
mean; none, as the middle of a one-token subject: the row is absent), and a row's average
indirect effect (AIE) is its mean over the records that have it. The reference notebook
pools the middle and further tokens of all records instead; the two agree when every
record has as many of them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from seqedit.errors import SeqeditError
from seqedit.methods.arch import ModuleNames, module_names_for
from seqedit.methods.hooks import ModuleTrace
from seqedit.methods.tokens import subject_index
from seqedit.methods.trace_rows import (
    KINDS,
    LAST_SUBJECT_ROW,
    LAST_TOKEN_ROW,
    ROW_LABELS,
    BestLayers,
    TracedFact,
    TraceKind,
    TraceResult,
    TraceSettings,
    average_rows,
    token_rows,
)
from seqedit.schemas.requests import EditRequest, spaced

_TEMPLATES = {"hidden": "layer_module_tmp", "mlp": "mlp_module_tmp", "attn": "attn_module_tmp"}


class TraceError(SeqeditError, ValueError):
    """Requests that cannot be traced (no fact the model knows, a subject without tokens)."""


@dataclass(frozen=True)
class TracePrompt:
    """One fact ready to trace. `input_ids` (T,) is the filled prompt; the subject covers
    tokens `subject_first..subject_last` (inclusive); `target` is the first token id of
    `spaced(target_true)`."""

    case_id: int
    input_ids: torch.Tensor
    subject_first: int
    subject_last: int
    target: int


@dataclass(frozen=True)
class Restoration:
    """Module outputs set back to their clean values: each of `modules` at each of `tokens`
    (both empty: the corrupted run)."""

    modules: tuple[str, ...] = ()
    tokens: tuple[int, ...] = ()


@dataclass(frozen=True)
class RecordTrace:
    """One traced fact: probabilities and `effects[kind]`, (T, L) indirect effects."""

    prompt: TracePrompt
    p_clean: float
    p_corrupt: float
    effects: dict[str, torch.Tensor]


@dataclass
class KnownSplit:
    """Requests sorted by whether the model knows them; `example` describes one miss."""

    kept: list[TracePrompt] = field(default_factory=list)
    unknown: list[int] = field(default_factory=list)
    no_target: list[int] = field(default_factory=list)
    example: str = ""


def trace_prompt(tokenizer: PreTrainedTokenizerBase, request: EditRequest) -> TracePrompt:
    """The tokens, subject span and target token of `request` (which has a target_true)."""
    assert request.target_true is not None
    try:
        first, last = (
            subject_index(tokenizer, request.prompt, request.subject, position)
            for position in ("subject_first", "subject_last")
        )
    except ValueError as exc:
        raise TraceError(
            f"record case_id={request.case_id}, field 'subject': {request.subject!r} has no "
            f"token of its own in {request.filled_prompt!r} ({exc})"
        ) from exc
    ids = tokenizer(request.filled_prompt, return_tensors="pt")["input_ids"][0]
    target = tokenizer(spaced(request.target_true), add_special_tokens=False)["input_ids"]
    return TracePrompt(request.case_id, ids, first, last, int(target[0]))


def clean_run(
    model: PreTrainedModel, input_ids: torch.Tensor, modules: Sequence[str]
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """The clean outputs (1, T, d) of `modules` and the next-token probabilities (V,)."""
    device = next(model.parameters()).device
    with torch.no_grad(), ModuleTrace(model, modules, retain_output=True) as trace:
        out = model(input_ids=input_ids[None].to(device), use_cache=False, logits_to_keep=1)
    return trace.outputs, out.logits[0, -1].float().softmax(-1)


def known_prompts(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, requests: Sequence[EditRequest]
) -> KnownSplit:
    """Split `requests` into facts the model knows (traced), facts it does not know, and
    records without a target_true (zsRE)."""
    split = KnownSplit()
    for request in requests:
        if request.target_true is None:
            split.no_target.append(request.case_id)
            continue
        prompt = trace_prompt(tokenizer, request)
        predicted = int(clean_run(model, prompt.input_ids, [])[1].argmax())
        if predicted == prompt.target:
            split.kept.append(prompt)
            continue
        split.unknown.append(request.case_id)
        if not split.example:
            split.example = (
                f"case_id={request.case_id}: after {request.filled_prompt!r} the model says "
                f"{tokenizer.decode([predicted])!r}, target_true starts with "
                f"{tokenizer.decode([prompt.target])!r}"
            )
    return split


def subject_embedding_std(model: PreTrainedModel, prompts: Sequence[TracePrompt]) -> float:
    """Standard deviation of every coordinate of the input embeddings of the subject tokens
    of `prompts` (the scale of the corrupting noise)."""
    embedding = model.get_input_embeddings()
    device = embedding.weight.device
    with torch.no_grad():
        vectors = [
            embedding(p.input_ids[p.subject_first : p.subject_last + 1].to(device)) for p in prompts
        ]
    return float(torch.cat(vectors).float().std())


def window_layers(layer: int, window: int, n_layer: int) -> range:
    """The layers restored together around centre `layer`: `window` of them, clipped."""
    return range(max(0, layer - window // 2), min(n_layer, layer + window - window // 2))


def restorations(
    names: ModuleNames, kind: TraceKind, n_layer: int, n_tokens: int, window: int
) -> list[Restoration]:
    """One restoration per (token, layer) for `kind`, token-major (index t * n_layer + l)."""
    template = getattr(names, _TEMPLATES[kind])
    plan = []
    for token in range(n_tokens):
        for layer in range(n_layer):
            layers = [layer] if kind == "hidden" else window_layers(layer, window, n_layer)
            plan.append(Restoration(tuple(template.format(i) for i in layers), (token,)))
    return plan


def restored_probs(
    model: PreTrainedModel,
    prompt: TracePrompt,
    noise: torch.Tensor,
    clean: dict[str, torch.Tensor],
    plan: Sequence[Restoration],
    max_batch: int = 128,
) -> torch.Tensor:
    """(len(plan),) mean P(target) over the noise samples, per restoration.

    `noise` (S, n_subject, d) is added to the subject tokens' input embeddings; `clean`
    holds the clean outputs (1, T, d) of every module the plan names. Restorations run
    max(1, max_batch // S) at a time, S rows each.
    """
    embedding = model.get_input_embeddings()
    noised = next(name for name, module in model.named_modules() if module is embedding)
    per_pass = max(1, max_batch // noise.shape[0])
    chunks = [plan[start : start + per_pass] for start in range(0, len(plan), per_pass)]
    return torch.cat([_pass_probs(model, prompt, noise, clean, c, noised) for c in chunks])


def _pass_probs(
    model: PreTrainedModel,
    prompt: TracePrompt,
    noise: torch.Tensor,
    clean: dict[str, torch.Tensor],
    plan: Sequence[Restoration],
    noised: str,
) -> torch.Tensor:
    """One forward pass of len(plan) * S rows; row r restores plan[r // S] and carries
    noise sample r % S on the output of module `noised`. Returns (len(plan),)."""
    device = noise.device
    n, samples, n_tokens = len(plan), noise.shape[0], prompt.input_ids.shape[0]
    masks: dict[str, torch.Tensor] = {}
    for row, restoration in enumerate(plan):
        for name in restoration.modules:
            mask = masks.setdefault(name, torch.zeros(n, n_tokens, dtype=torch.bool))
            mask[row, list(restoration.tokens)] = True
    row_masks = {k: m.repeat_interleave(samples, 0)[..., None].to(device) for k, m in masks.items()}
    subject = slice(prompt.subject_first, prompt.subject_last + 1)
    tiled = noise.repeat(n, 1, 1)  # (n * S, n_subject, d)

    def patch(name: str, output: torch.Tensor) -> torch.Tensor:
        if name == noised:  # (n * S, T, d) token embeddings
            output = output.clone()
            output[:, subject] += tiled
            return output
        return torch.where(row_masks[name], clean[name].to(output.dtype), output)

    ids = prompt.input_ids.to(device)[None].expand(n * samples, n_tokens)
    with torch.no_grad(), ModuleTrace(model, [noised, *row_masks], edit_output=patch):
        logits = model(input_ids=ids, use_cache=False, logits_to_keep=1).logits[:, -1]
    probs = logits.float().softmax(-1)[:, prompt.target]  # (n * S,)
    return probs.view(n, samples).mean(1)


def trace_record(
    model: PreTrainedModel,
    prompt: TracePrompt,
    *,
    noise_std: float,
    settings: TraceSettings,
    generator: torch.Generator,
    names: ModuleNames | None = None,
) -> RecordTrace:
    """The indirect effects of every kind at every (token, layer) of one fact.

    The noise (S, n_subject, d) is drawn on the CPU from `generator` (the same values on
    any device) and shared by the corrupted run and every restoration.
    """
    names = names or module_names_for(model)
    n_layer, n_tokens = model.config.num_hidden_layers, prompt.input_ids.shape[0]
    window = min(settings.window, n_layer)
    plans = [restorations(names, kind, n_layer, n_tokens, window) for kind in KINDS]
    modules = sorted({m for plan in plans for r in plan for m in r.modules})
    clean, probs = clean_run(model, prompt.input_ids, modules)
    weight = model.get_input_embeddings().weight
    shape = (settings.samples, prompt.subject_last - prompt.subject_first + 1, weight.shape[1])
    noise = noise_std * torch.randn(shape, generator=generator)
    plan = [Restoration(), *(r for kind_plan in plans for r in kind_plan)]
    p = restored_probs(model, prompt, noise.to(weight), clean, plan, settings.max_batch)
    effects = (p[1:] - p[0]).view(len(KINDS), n_tokens, n_layer).cpu()
    by_kind = dict(zip(KINDS, effects, strict=True))
    return RecordTrace(prompt, float(probs[prompt.target]), float(p[0]), by_kind)


def summarize(
    traces: Sequence[RecordTrace],
    split: KnownSplit,
    settings: TraceSettings,
    *,
    model: str,
    n_layer: int,
    noise_std: float,
) -> TraceResult:
    """The `TraceResult` of traced records: rows per record, averaged (`average_rows`)."""
    aie: dict[str, list[list[float] | None]] = {}
    best: dict[str, BestLayers] = {}
    counts: list[int] = []
    for kind in KINDS:
        per_record = [
            token_rows(t.effects[kind], t.prompt.subject_first, t.prompt.subject_last)
            for t in traces
        ]
        rows, counts = average_rows(per_record)
        aie[kind] = [None if row is None else row.tolist() for row in rows]
        last_subject, last_token = rows[LAST_SUBJECT_ROW], rows[LAST_TOKEN_ROW]
        assert last_subject is not None and last_token is not None
        best[kind] = BestLayers(
            last_subject=int(last_subject.argmax()), last_token=int(last_token.argmax())
        )
    facts = [
        TracedFact(case_id=t.prompt.case_id, p_clean=t.p_clean, p_corrupt=t.p_corrupt,
                   subject_tokens=(t.prompt.subject_first, t.prompt.subject_last))
        for t in traces
    ]  # fmt: skip
    return TraceResult(
        model=model, n_layer=n_layer, settings=settings, window=min(settings.window, n_layer),
        noise_std=noise_std, n_records=len(split.kept) + len(split.unknown) + len(split.no_target),
        n_traced=len(facts),
        skipped_unknown=split.unknown, skipped_no_target=split.no_target,
        p_clean=sum(f.p_clean for f in facts) / len(facts),
        p_corrupt=sum(f.p_corrupt for f in facts) / len(facts),
        row_labels=list(ROW_LABELS), row_records=counts, aie=aie, best_layers=best, facts=facts,
    )  # fmt: skip


def trace_facts(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    requests: Sequence[EditRequest],
    settings: TraceSettings | None = None,
    *,
    model_name: str = "model",
    progress: Callable[[int, int], None] | None = None,
) -> TraceResult:
    """Causal tracing of every request the model knows; `progress(done, total)` after each.

    Raises `TraceError` when no request is known (naming one the model gets wrong).
    """
    settings = settings or TraceSettings()
    names = module_names_for(model)
    split = known_prompts(model, tokenizer, requests)
    if not split.kept:
        raise TraceError(
            f"none of the {len(requests)} records can be traced: {len(split.no_target)} have no "
            f"target_true, the model does not know the {len(split.unknown)} others"
            + (f" (e.g. {split.example})" if split.example else "")
            + "; trace facts whose target_true the model predicts as its next token"
        )
    noise_std = settings.noise * subject_embedding_std(model, split.kept)
    generator = torch.Generator().manual_seed(settings.seed)
    traces = []
    for done, prompt in enumerate(split.kept, start=1):
        traces.append(
            trace_record(model, prompt, noise_std=noise_std, settings=settings,
                         generator=generator, names=names)
        )  # fmt: skip
        if progress is not None:
            progress(done, len(split.kept))
    return summarize(
        traces, split, settings, model=model_name,
        n_layer=model.config.num_hidden_layers, noise_std=noise_std,
    )  # fmt: skip
