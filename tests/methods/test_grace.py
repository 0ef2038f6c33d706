"""GRACE on a tiny random GPT-2: one edit, codebook decisions, replay, hook under padding."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError
from transformers import (
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)

from seqedit.methods.codebook import retrieve, substitute
from seqedit.methods.grace import GRACE, GraceConfig, GraceContext
from seqedit.methods.hooks import ModuleTrace
from seqedit.methods.registry import get_method
from seqedit.methods.scoring import TargetScore, score_targets
from seqedit.methods.updates import EditResult, MemoryEntry
from seqedit.schemas.requests import EditRequest
from tests.methods.tiny import tiny_gpt2

BORN = EditRequest(
    case_id=0,
    prompt="{} was born in",
    subject="Fenna Underhill",
    target_new="Kyrosoft",
    target_true="Corvale",
)
WORKS = EditRequest(case_id=1, prompt="{} works for", subject="Helka Tillman", target_new="Corvale")
PLAYS = EditRequest(
    case_id=2, prompt="{} plays the", subject="Kelvin Everly", target_new="Kyrosoft"
)
ONE_TOKEN = BORN.model_copy(update={"target_new": "the"})
"""One value at one position sets the next token; later target tokens see it only through
attention, weakly in a 2-layer model: success is asserted on a one-token target."""
UNRELATED = "By profession, Dovana Ravensworth is a"


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model(tokenizer: PreTrainedTokenizerFast) -> GPT2LMHeadModel:
    """The tiny GPT-2 with its (tied) embeddings scaled up: logits that span ~20 nats, not
    ~1, so an edit can make its target clearly likely."""
    net = tiny_gpt2(len(tokenizer))
    net.transformer.wte.weight.mul_(30.0)
    return net


def _config(**overrides: object) -> GraceConfig:
    """Layer 0 of 2, so the value at the last prompt token reaches every target token."""
    return GraceConfig(**{"layer": 0, "n_iter": 40, "edit_lr": 0.5, "eps_init": 0.1, **overrides})


def _edit(
    model: GPT2LMHeadModel,
    tokenizer: PreTrainedTokenizerFast,
    request: EditRequest,
    config: GraceConfig,
    context: GraceContext,
    *,
    apply: bool = True,
) -> EditResult:
    torch.manual_seed(request.case_id)
    result = GRACE.edit(model, tokenizer, request, config, context)
    if apply:
        assert GRACE.memory is not None
        GRACE.memory.apply(context, result.updates[0])
    return result


def _entry(result: EditResult) -> MemoryEntry:
    (entry,) = result.updates
    assert isinstance(entry, MemoryEntry)
    return entry


def _distance(model: GPT2LMHeadModel, tokenizer: PreTrainedTokenizerFast, a: str, b: str) -> float:
    """Distance of the queries of two rewrite prompts (read from edits on empty codebooks)."""
    keys = []
    for prompt in (a, b):
        request = BORN.model_copy(update={"prompt": prompt, "subject": "Fenna Underhill"})
        context = GRACE.prepare(model, tokenizer, _config(n_iter=1), None, None)
        keys.append(_edit(model, tokenizer, request, _config(n_iter=1), context).key)
    return float((keys[0] - keys[1]).norm())


def _one_by_one(
    net: PreTrainedModel, tokenizer: PreTrainedTokenizerFast, prompts: list[str], targets: list[str]
) -> list[TargetScore]:
    pairs = zip(prompts, targets, strict=True)
    return [score_targets(net, tokenizer, [p], [t])[0] for p, t in pairs]


def test_record_and_config() -> None:
    assert get_method("grace") is GRACE
    assert GRACE.memory is not None and not GRACE.batched
    config = GraceConfig(layer=3)
    assert GRACE.layers(config) == [] and GRACE.uses_second_moment(config) is False
    assert GraceConfig.step_budget_fields == ("n_iter",)
    assert (config.role, config.replacement, config.val_init) == ("mlp_out", "replace_last", "cold")
    for field, value, words in [
        ("replacement", "replace_prompt", "not implemented"),
        ("dist_fn", "mmd", "only 'euc'"),
        ("val_train", "adv", "perturbation"),
        ("eps_expand", "moving_avg", "moving_average"),
    ]:
        with pytest.raises(ValidationError, match=words):
            GraceConfig(layer=0, **{field: value})
    with pytest.raises(ValidationError):
        GraceConfig(layer=0, num_pert=8)


def test_prepare_names_the_adaptor(
    model: GPT2LMHeadModel, tokenizer: PreTrainedTokenizerFast
) -> None:
    context = GRACE.prepare(model, tokenizer, _config(), None, None)
    assert context.module == "transformer.h.0.mlp.c_proj"
    assert context.keys.shape == (0, 128) and context.values.shape == (0, 32)
    context = GRACE.prepare(model, tokenizer, _config(role="mlp_in", layer=1), None, None)
    assert context.module == "transformer.h.1.mlp.c_fc"
    assert context.keys.shape == (0, 32) and context.values.shape == (0, 128)
    assert GRACE.memory is not None and GRACE.memory.size(context) == 0


@pytest.mark.parametrize("replacement", ["replace_last", "replace_all"])
def test_edit_succeeds_only_once_applied_and_leaves_the_rest_alone(
    model: GPT2LMHeadModel, tokenizer: PreTrainedTokenizerFast, replacement: str
) -> None:
    assert GRACE.memory is not None
    config = _config(replacement=replacement)
    context = GRACE.prepare(model, tokenizer, config, None, None)
    handle = GRACE.memory.install(model, context)
    try:
        weights = {k: v.clone() for k, v in model.state_dict().items()}
        prompts, targets = [BORN.filled_prompt] * 2, [ONE_TOKEN.target_new, BORN.target_true]
        before_new, _ = score_targets(model, tokenizer, prompts, targets)
        unrelated = model(**tokenizer(UNRELATED, return_tensors="pt")).logits

        result = _edit(model, tokenizer, ONE_TOKEN, config, context, apply=False)
        for key, value in model.state_dict().items():
            assert torch.equal(value, weights[key]), key
        assert GRACE.memory.size(context) == 0
        assert score_targets(model, tokenizer, prompts, targets)[0] == before_new
        assert result.initial_loss == pytest.approx(before_new.mean_nll, rel=1e-5)

        GRACE.memory.apply(context, _entry(result))  # the installed hook sees it
        new, true = score_targets(model, tokenizer, prompts, targets)
        assert GRACE.memory.size(context) == 1
        assert new.prob > 0.9 and true.prob < 1e-3 and before_new.prob < 1e-3
        assert new.mean_nll == pytest.approx(result.loss, rel=1e-4, abs=1e-6)
        assert result.steps == 40 and result.loss < result.initial_loss
        assert result.key.shape == (128,) and result.value.shape == (32,)
        after = model(**tokenizer(UNRELATED, return_tensors="pt")).logits
        assert torch.equal(after, unrelated)
    finally:
        handle.remove()
    assert score_targets(model, tokenizer, prompts, targets)[0] == before_new


def test_add_split_overwrite_expand_update(
    model: GPT2LMHeadModel, tokenizer: PreTrainedTokenizerFast
) -> None:
    near = "{} was born"  # same subject, one token shorter: a different, nearby query
    d = _distance(model, tokenizer, BORN.prompt, near)
    assert 0.1 < d < 2.0
    nearby = BORN.model_copy(update={"case_id": 5, "prompt": near})

    far = GRACE.prepare(model, tokenizer, _config(eps_init=d / 4, n_iter=3), None, None)
    first = _entry(_edit(model, tokenizer, BORN, _config(eps_init=d / 4, n_iter=3), far))
    assert first.info["action"] == "add" and first.tensors["rows"].tolist() == [0]
    added = _entry(_edit(model, tokenizer, nearby, _config(eps_init=d / 4, n_iter=3), far))
    assert added.info["action"] == "add" and added.tensors["rows"].tolist() == [1]
    assert far.radii.tolist() == pytest.approx([d / 4, d / 4])

    big = _config(eps_init=2 * d, n_iter=3)
    context = GRACE.prepare(model, tokenizer, big, None, None)
    _edit(model, tokenizer, BORN, big, context)
    conflict = nearby.model_copy(update={"target_new": "Corvale"})
    split = _entry(_edit(model, tokenizer, conflict, big, context))
    assert split.info["action"] == "split" and split.tensors["rows"].tolist() == [0, 1]
    assert split.info["distance"] == pytest.approx(d, rel=1e-5)
    assert context.radii.tolist() == pytest.approx([d / 2 - 1e-5, d / 2], rel=1e-6)
    assert torch.equal(context.values[0], split.tensors["values"][0])  # the old value stays
    assert retrieve(context.keys[None], context.keys, context.radii).tolist() == [[0, 1]]

    again = _entry(
        _edit(model, tokenizer, BORN.model_copy(update={"target_new": "Lake"}), big, context)
    )
    assert again.info["action"] == "overwrite" and again.tensors["rows"].tolist() == [0]
    assert GRACE.memory is not None and GRACE.memory.size(context) == 2
    assert torch.equal(context.labels[0], again.tensors["labels"][0])  # Lake's tokens now

    for expand, moved in (("coverage", False), ("moving_average", True)):
        config = _config(eps_init=0.75 * d, eps_expand=expand, n_iter=3)
        context = GRACE.prepare(model, tokenizer, config, None, None)
        _edit(model, tokenizer, BORN, config, context)
        key = context.keys[0].clone()
        result = _edit(model, tokenizer, nearby, config, context)
        assert _entry(result).info["action"] == "expand" and GRACE.memory.size(context) == 1
        assert context.radii.tolist() == pytest.approx([d], rel=1e-5)
        assert torch.equal(context.keys[0], 0.5 * key + 0.5 * result.key if moved else key)
        same = _entry(_edit(model, tokenizer, BORN, config, context))
        assert same.info["action"] == "update" and same.tensors["rows"].tolist() == [0]
        assert torch.equal(same.tensors["radii"], context.radii)


def test_replay_and_state_round_trip_bit_for_bit(
    model: GPT2LMHeadModel, tokenizer: PreTrainedTokenizerFast
) -> None:
    assert GRACE.memory is not None
    config = _config(n_iter=5, eps_init=2.0)
    context = GRACE.prepare(model, tokenizer, config, None, None)
    empty = GRACE.state(context)
    entries = [
        _entry(_edit(model, tokenizer, r, config, context))
        for r in (BORN, WORKS, PLAYS, BORN.model_copy(update={"target_new": "Helka"}))
    ]
    state = GRACE.state(context)
    assert [e.info["action"] for e in entries] == ["add", "split", "expand", "overwrite"]
    assert state["labels"].dtype == torch.long and state["labels"].shape == (2, 5)

    fresh = GRACE.prepare(model, tokenizer, config, None, None)
    for entry in entries:
        GRACE.memory.apply(fresh, MemoryEntry({k: v.clone() for k, v in entry.tensors.items()}))
    replayed = GRACE.state(fresh)
    assert set(replayed) == set(state)
    for name, tensor in state.items():
        assert replayed[name].dtype == tensor.dtype and torch.equal(replayed[name], tensor), name

    GRACE.load_state(fresh, empty)
    assert GRACE.memory.size(fresh) == 0
    GRACE.load_state(fresh, state)
    state["values"].add_(1.0)  # the loaded tensors are the context's own copies
    assert torch.equal(fresh.values, context.values)
    with pytest.raises(ValueError, match="holds"):
        GRACE.load_state(fresh, {"keys": state["keys"]})
    with pytest.raises(ValueError, match="do not fit"):
        GRACE.memory.apply(fresh, MemoryEntry({**entries[0].tensors, "rows": torch.tensor([9])}))


@pytest.mark.parametrize("replacement", ["replace_last", "replace_all"])
def test_padded_batch_scores_as_each_prompt_alone(
    model: GPT2LMHeadModel, tokenizer: PreTrainedTokenizerFast, replacement: str
) -> None:
    assert GRACE.memory is not None
    config = _config(replacement=replacement)
    context = GRACE.prepare(model, tokenizer, config, None, None)
    for request in (BORN, WORKS):
        _edit(model, tokenizer, request, config, context)
    prompts = [BORN.filled_prompt, WORKS.filled_prompt, UNRELATED, BORN.filled_prompt, "Kelvin"]
    targets = [BORN.target_new, WORKS.target_new, "lawyer", "Corvale", "Everly plays the harp"]
    plain = score_targets(model, tokenizer, prompts, targets)
    handle = GRACE.memory.install(model, context)
    try:
        alone = _one_by_one(model, tokenizer, prompts, targets)
        for side in ("right", "left"):
            batch = score_targets(model, tokenizer, prompts, targets, padding_side=side)
            for one, many in zip(alone, batch, strict=True):
                assert many.mean_nll == pytest.approx(one.mean_nll, abs=1e-5)
                assert many.predicted == one.predicted
    finally:
        handle.remove()
    changed = [abs(a.mean_nll - b.mean_nll) > 1e-4 for a, b in zip(alone, plain, strict=True)]
    assert changed == [True, True, False, True, False]  # the edited prompts, and only they


def test_llama_adaptor_is_down_proj_and_answers_alike_in_a_padded_batch(
    tokenizer: PreTrainedTokenizerFast,
) -> None:
    """nn.Linear storage, rotary positions: a tiny random Llama (embeddings scaled up)."""
    assert GRACE.memory is not None
    torch.manual_seed(0)
    shape = {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "num_key_value_heads": 2,
        "max_position_embeddings": 64,
    }
    net = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), **shape)).eval()  # fmt: skip
    net.requires_grad_(False)
    net.model.embed_tokens.weight.mul_(30.0)
    net.lm_head.weight.mul_(30.0)
    config = _config()
    context = GRACE.prepare(net, tokenizer, config, None, None)
    assert context.module == "model.layers.0.mlp.down_proj"
    assert context.keys.shape == (0, 64) and context.values.shape == (0, 32)
    _edit(net, tokenizer, ONE_TOKEN, config, context)
    prompts = [BORN.filled_prompt, "Kelvin", BORN.filled_prompt]
    targets = [ONE_TOKEN.target_new, "Everly plays the harp", BORN.target_true]
    handle = GRACE.memory.install(net, context)
    try:
        alone = _one_by_one(net, tokenizer, prompts, targets)
        for side in ("right", "left"):
            batch = score_targets(net, tokenizer, prompts, targets, padding_side=side)
            for one, many in zip(alone, batch, strict=True):
                assert many.mean_nll == pytest.approx(one.mean_nll, abs=1e-5)
    finally:
        handle.remove()
    assert alone[0].prob > 0.9 > alone[2].prob


def test_edit_is_the_same_with_the_hook_installed(
    model: GPT2LMHeadModel, tokenizer: PreTrainedTokenizerFast
) -> None:
    """The split shrinks a radius the installed hook still uses: the edit must not see it."""
    assert GRACE.memory is not None
    config = _config(eps_init=5.0, n_iter=5)
    context = GRACE.prepare(model, tokenizer, config, None, None)
    _edit(model, tokenizer, BORN, config, context)
    conflict = BORN.model_copy(
        update={"case_id": 7, "prompt": "{} was born", "target_new": "Corvale"}
    )
    bare = _edit(model, tokenizer, conflict, config, context, apply=False)
    handle = GRACE.memory.install(model, context)
    try:
        hooked = _edit(model, tokenizer, conflict, config, context, apply=False)
    finally:
        handle.remove()
    assert _entry(bare).info["action"] == "split"
    for name, tensor in _entry(bare).tensors.items():
        assert torch.equal(_entry(hooked).tensors[name], tensor), name
    assert (hooked.loss, hooked.initial_loss) == (bare.loss, bare.initial_loss)


def test_warm_value_starts_at_the_adaptor_output(
    model: GPT2LMHeadModel, tokenizer: PreTrainedTokenizerFast
) -> None:
    config = _config(val_init="warm", n_iter=1, edit_lr=1e-6)
    context = GRACE.prepare(model, tokenizer, config, None, None)
    ids = tokenizer(BORN.filled_prompt, add_special_tokens=False, return_tensors="pt")
    with ModuleTrace(model, [context.module], retain_output=True) as trace:
        model(**ids)
    own = trace.outputs[context.module][0, -1]  # (d_out,) at the last prompt token
    result = _edit(model, tokenizer, BORN, config, context, apply=False)
    torch.testing.assert_close(result.value, own, rtol=0, atol=2e-6)


def test_retrieve_and_substitute_by_hand() -> None:
    keys = torch.tensor([[0.0, 0.0], [10.0, 0.0]])
    radii = torch.tensor([1.0, 0.5])
    inputs = torch.tensor([[[5.0, 5.0], [0.5, 0.0], [9.0, 0.0], [9.6, 0.0]]])  # (1, 4, 2)
    rows = retrieve(inputs, keys, radii)
    assert rows.tolist() == [[-1, 0, -1, 1]]
    values = torch.tensor([[1.0], [2.0]])
    outputs = torch.zeros(1, 4, 1)
    assert substitute(outputs, rows, values, "replace_last").flatten().tolist() == [0, 1, 0, 2]
    assert substitute(outputs, rows, values, "replace_all").flatten().tolist() == [0, 1, 1, 2]
    empty = retrieve(inputs, keys[:0], radii[:0])
    assert substitute(outputs, empty, values[:0], "replace_all") is outputs
