"""SERAC on a tiny random GPT-2: the memory, the soft mixture in scoring, the hard switch in
generation, the classifier's causality, the state and the scope-hit rate."""

from __future__ import annotations

import pytest
import torch
from transformers import GPT2LMHeadModel, PreTrainedTokenizerFast

from seqedit.methods.generation import generate_texts
from seqedit.methods.scoring import score_targets
from seqedit.methods.serac import SERAC, SeracConfig, SeracContext, scope_hit_rate
from seqedit.methods.serac_scope import EditMemory, ScopeClassifier, ScopeConfig, edit_prefix
from seqedit.schemas.requests import EditRequest, spaced
from tests.methods.tiny import BORN_IN, tiny_gpt2

WORKS = EditRequest(case_id=1, prompt="{} works for", subject="Helka Tillman", target_new="Corvale")
UNRELATED = "By profession, Dovana Ravensworth is a"


def _context(
    tokenizer: PreTrainedTokenizerFast, config: SeracConfig | None = None
) -> tuple[GPT2LMHeadModel, SeracContext]:
    """The base model and a SERAC context whose counterfactual model is another random GPT-2
    (so mixtures are visible) and whose classifier is trained parts saved and read back."""
    base = tiny_gpt2(len(tokenizer))
    torch.manual_seed(1)
    other = tiny_gpt2(len(tokenizer))
    with torch.no_grad():
        for param in other.parameters():
            param.add_(0.5 * torch.randn_like(param))
    classifier = ScopeClassifier(32, ScopeConfig(dim=16))
    trained = {
        "classifier": classifier.state_dict(),
        "counterfactual": other.state_dict(),
        "counterfactual_config": other.config.to_dict(),
        "network": ScopeConfig(dim=16).model_dump(),
    }
    config = config or SeracConfig()
    context = SERAC.prepare(base, tokenizer, config, None, None, trained)
    return base, context


def _edit(base: GPT2LMHeadModel, tokenizer, context: SeracContext, request: EditRequest) -> None:
    result = SERAC.edit(base, tokenizer, request, context.config, context)
    assert SERAC.memory is not None
    for entry in result.updates:
        SERAC.memory.apply(context, entry)  # type: ignore[arg-type]


def _ids(tokenizer: PreTrainedTokenizerFast, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def test_an_empty_memory_changes_nothing(tokenizer: PreTrainedTokenizerFast) -> None:
    base, context = _context(tokenizer)
    ids = torch.tensor([_ids(tokenizer, BORN_IN.filled_prompt)])
    before = base(input_ids=ids).logits
    assert SERAC.memory is not None
    handle = SERAC.memory.install(base, context)
    try:
        assert torch.equal(base(input_ids=ids).logits, before)
    finally:
        handle.remove()


@torch.no_grad()
def _expected(
    base: GPT2LMHeadModel, context: SeracContext, row: list[int], min_scope: float
) -> torch.Tensor:
    """The soft mixture by hand: log((1 - s) p_base + s p_cf) where s >= min_scope."""
    ids = torch.tensor(row)
    sigma, index = context.memory.scope(context.classifier, context.embed, ids)
    base_lp = torch.log_softmax(base(input_ids=ids[None]).logits[0].float(), dim=-1)
    out = base_lp.clone()
    for t in range(len(row)):
        s = float(sigma[t])
        if s < min_scope:
            continue
        prefix = context.memory.prefix_ids[int(index[t])]
        cf_logits = context.counterfactual(input_ids=torch.cat([prefix, ids])[None]).logits[0]
        cf_lp = torch.log_softmax(cf_logits[len(prefix) + t].float(), dim=-1)
        out[t] = torch.log((1 - s) * base_lp[t].exp() + s * cf_lp.exp())
    return out


def test_scoring_is_the_soft_mixture_and_out_of_scope_rows_are_the_base_model(
    tokenizer: PreTrainedTokenizerFast,
) -> None:
    min_scope = 0.5
    base, context = _context(tokenizer, SeracConfig(min_scope=min_scope))
    _edit(base, tokenizer, context, BORN_IN)
    inside = _ids(tokenizer, BORN_IN.filled_prompt + spaced(BORN_IN.target_new))
    outside = _ids(tokenizer, UNRELATED)
    sigma_out, _ = context.memory.scope(context.classifier, context.embed, torch.tensor(outside))
    sigma_in, _ = context.memory.scope(context.classifier, context.embed, torch.tensor(inside))
    assert float(sigma_out.max()) < min_scope < float(sigma_in[-1])
    plain = base(input_ids=torch.tensor([outside])).logits[0]
    expected_in = _expected(base, context, inside, min_scope)

    width = max(len(inside), len(outside))  # one right-padded batch, as scoring packs it
    ids = torch.zeros(2, width, dtype=torch.long)
    mask = torch.zeros(2, width, dtype=torch.long)
    for b, row in enumerate((inside, outside)):
        ids[b, : len(row)], mask[b, : len(row)] = torch.tensor(row), 1
    assert SERAC.memory is not None
    handle = SERAC.memory.install(base, context)
    try:
        logits = base(input_ids=ids, attention_mask=mask).logits
        scores = score_targets(base, tokenizer, [BORN_IN.filled_prompt], [BORN_IN.target_new])
    finally:
        handle.remove()
    got_in = torch.log_softmax(logits[0, : len(inside)].float(), dim=-1)
    torch.testing.assert_close(got_in, expected_in, atol=2e-5, rtol=1e-4)
    assert torch.equal(logits[1, : len(outside)], plain), "out of scope: the base model exactly"
    # the scorer reads the hooked model's outputs (not its body and head apart)
    target = _ids(tokenizer, spaced(BORN_IN.target_new))
    prompt_len = len(inside) - len(target)
    by_hand = -expected_in[prompt_len - 1 : -1].gather(1, torch.tensor(target)[:, None]).mean()
    assert scores[0].mean_nll == pytest.approx(float(by_hand), rel=1e-4)


def test_generation_switches_hard_to_the_counterfactual_model(
    tokenizer: PreTrainedTokenizerFast,
) -> None:
    base, context = _context(tokenizer)
    _edit(base, tokenizer, context, BORN_IN)
    prompt = BORN_IN.filled_prompt
    prefix = edit_prefix(tokenizer, BORN_IN, context.separator)
    row = _ids(tokenizer, prompt)
    for _ in range(4):  # greedy by hand: the counterfactual model reading prefix + row
        sigma, _ = context.memory.scope(context.classifier, context.embed, torch.tensor(row))
        model = context.counterfactual if float(sigma[-1]) > 0.5 else base
        ids = torch.tensor([(prefix if model is context.counterfactual else []) + row])
        row.append(int(model(input_ids=ids).logits[0, -1].argmax()))
    expected = tokenizer.decode(row)
    plain = generate_texts(base, tokenizer, [UNRELATED], max_new_tokens=4, top_k=1, generator=None)
    assert SERAC.memory is not None
    handle = SERAC.memory.install(base, context)
    try:
        texts = generate_texts(
            base, tokenizer, [prompt, UNRELATED], max_new_tokens=4, top_k=1, generator=None
        )
    finally:
        handle.remove()
    assert texts[0] == expected
    assert texts[1] == plain[0]


def test_the_classifier_is_causal(tokenizer: PreTrainedTokenizerFast) -> None:
    base, context = _context(tokenizer)
    _edit(base, tokenizer, context, BORN_IN)
    _edit(base, tokenizer, context, WORKS)
    row = torch.tensor(_ids(tokenizer, UNRELATED + " Fenna Underhill was born in Kyrosoft"))
    sigma, index = context.memory.scope(context.classifier, context.embed, row)
    for t in (3, 8, len(row) - 1):
        s_t, i_t = context.memory.scope(context.classifier, context.embed, row[: t + 1])
        torch.testing.assert_close(s_t, sigma[: t + 1])
        assert torch.equal(i_t, index[: t + 1])


def test_the_memory_accumulates_and_its_state_round_trips(
    tokenizer: PreTrainedTokenizerFast,
) -> None:
    base, context = _context(tokenizer)
    requests = [BORN_IN, WORKS, BORN_IN.model_copy(update={"case_id": 2, "target_new": "Nowhere"})]
    for request in requests:
        _edit(base, tokenizer, context, request)
    assert SERAC.memory is not None and SERAC.memory.size(context) == 3
    state = SERAC.state(context)
    _, fresh = _context(tokenizer)
    SERAC.load_state(fresh, state)
    assert SERAC.memory.size(fresh) == 3
    for got, want in zip(fresh.memory.prefix_ids, context.memory.prefix_ids, strict=True):
        assert torch.equal(got, want)
    row = torch.tensor(_ids(tokenizer, WORKS.filled_prompt))
    torch.testing.assert_close(
        fresh.memory.scope(fresh.classifier, fresh.embed, row)[0],
        context.memory.scope(context.classifier, context.embed, row)[0],
    )
    with pytest.raises(ValueError, match="SERAC state holds"):
        SERAC.load_state(fresh, {"key_ids": state["key_ids"]})
    broken = {**state, "key_lengths": state["key_lengths"] + 1}
    with pytest.raises(ValueError, match="ids and their lengths disagree"):
        SERAC.load_state(fresh, broken)
    empty = EditMemory()
    assert len(empty) == 0 and empty.state()["key_lengths"].numel() == 0


def test_scope_hit_rate_counts_probes_routed_to_an_edit(
    tokenizer: PreTrainedTokenizerFast,
) -> None:
    base, context = _context(tokenizer)
    assert scope_hit_rate(context, tokenizer, [UNRELATED]) == {"scope_hit_rate": 0.0}
    _edit(base, tokenizer, context, BORN_IN)
    probes = [BORN_IN.filled_prompt, UNRELATED]
    hits = [
        float(context.memory.scope(context.classifier, context.embed,
                                   torch.tensor(_ids(tokenizer, p)))[0][-1]) > 0.5
        for p in probes
    ]  # fmt: skip
    assert hits[0], "an edit's own prompt is in its scope"
    assert scope_hit_rate(context, tokenizer, probes) == {"scope_hit_rate": sum(hits) / 2}
