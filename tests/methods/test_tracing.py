"""Causal tracing on tiny GPT-2 and Llama models that learned six facts (about 1 s each).

The models are random-init, then trained for 100 steps on six statements whose answers
differ by subject (so the answer must be read from the subject); every answer's first
token is a whole `Ġword` token of the tiny tokenizer, so the facts count as known.
"""

from __future__ import annotations

import pytest
import torch
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)

from seqedit.methods.arch import module_names_for, module_names_for_type
from seqedit.methods.tracing import (
    KINDS,
    ROW_LABELS,
    Restoration,
    TraceError,
    TracePrompt,
    TraceResult,
    TraceSettings,
    average_rows,
    clean_run,
    restorations,
    restored_probs,
    subject_embedding_std,
    token_rows,
    trace_facts,
    trace_prompt,
    trace_record,
    window_layers,
)
from seqedit.schemas.requests import EditRequest, spaced

N_LAYER = 3
FACTS = [
    ("{} was born in", "Fenna Underhill", "Kyrosoft"),
    ("{} was born in", "Helka Tillman", "people"),
    ("{} was born in", "Kelvin Everly", "the"),
    ("{} was born in", "Dovana Ravensworth", "in"),
    ("By profession, {} is a", "Fenna Underhill", "people"),
    ("By profession, {} is a", "Kelvin Everly", "Kyrosoft"),
]
"""(template, subject, answer): the facts the tiny models learn."""


def fact_requests() -> list[EditRequest]:
    return [
        EditRequest(case_id=i, prompt=t, subject=s, target_new="harp", target_true=a)
        for i, (t, s, a) in enumerate(FACTS)
    ]


def trained_model(arch: str, tokenizer: PreTrainedTokenizerFast) -> PreTrainedModel:
    """A 3-layer, 32-wide `arch` model (seed 0) trained to recall FACTS, frozen, eval mode."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        if arch == "gpt2":
            config = GPT2Config(n_layer=N_LAYER, n_embd=32, n_head=2, n_positions=64,
                                vocab_size=len(tokenizer), bos_token_id=0,
                                eos_token_id=0)  # fmt: skip
            model: PreTrainedModel = GPT2LMHeadModel(config)
        else:
            config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                 num_hidden_layers=N_LAYER, num_attention_heads=2,
                                 num_key_value_heads=1, max_position_embeddings=64,
                                 bos_token_id=0, eos_token_id=0, pad_token_id=0)  # fmt: skip
            model = LlamaForCausalLM(config)
        texts = [t.replace("{}", s) + spaced(a) for t, s, a in FACTS]
        batch = tokenizer(texts, padding=True, return_tensors="pt")
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
        model.train()
        for _ in range(100):
            loss = model(**batch, labels=labels).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    model.eval()
    for param in model.parameters():
        param.requires_grad_(False)
    return model


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def model(request: pytest.FixtureRequest, tokenizer: PreTrainedTokenizerFast) -> PreTrainedModel:
    return trained_model(request.param, tokenizer)


def _corrupted(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerFast, case: int, scale: float = 3.0
) -> tuple[TracePrompt, list[str], dict[str, torch.Tensor], float, torch.Tensor]:
    """A fact's prompt, its clean outputs of every block and the noise for 4 samples."""
    prompt = trace_prompt(tokenizer, fact_requests()[case])
    names = module_names_for(model)
    blocks = [names.layer_module_tmp.format(i) for i in range(N_LAYER)]
    clean, probs = clean_run(model, prompt.input_ids, blocks)
    std = subject_embedding_std(model, [prompt])
    n_subject = prompt.subject_last - prompt.subject_first + 1
    noise = scale * std * torch.randn(4, n_subject, 32, generator=torch.Generator().manual_seed(1))
    return prompt, blocks, clean, float(probs[prompt.target]), noise


@pytest.mark.parametrize(
    ("layer", "window", "n_layer", "expected"),
    [(0, 10, 48, range(0, 5)), (20, 10, 48, range(15, 25)), (47, 10, 48, range(42, 48)),
     (5, 1, 48, range(5, 6)), (0, 3, 3, range(0, 2)), (2, 3, 3, range(1, 3))],
)  # fmt: skip
def test_window_layers_are_the_references(
    layer: int, window: int, n_layer: int, expected: range
) -> None:
    assert window_layers(layer, window, n_layer) == expected


def test_restorations_name_each_architectures_modules() -> None:
    gpt2, llama = module_names_for_type("gpt2"), module_names_for_type("llama")
    hidden = restorations(gpt2, "hidden", N_LAYER, 2, window=3)
    assert len(hidden) == 2 * N_LAYER
    assert hidden[N_LAYER + 1] == Restoration(("transformer.h.1",), (1,))  # token-major
    mlp = restorations(gpt2, "mlp", N_LAYER, 1, window=3)
    assert mlp[0].modules == ("transformer.h.0.mlp", "transformer.h.1.mlp")
    attn = restorations(llama, "attn", N_LAYER, 1, window=3)
    assert attn[1].modules == tuple(f"model.layers.{i}.self_attn" for i in range(3))


def test_the_subject_tokens_are_the_subjects(tokenizer: PreTrainedTokenizerFast) -> None:
    for request in fact_requests():
        prompt = trace_prompt(tokenizer, request)
        span = prompt.input_ids[prompt.subject_first : prompt.subject_last + 1]
        assert tokenizer.decode(span).strip() == request.subject
        first = tokenizer.decode([prompt.target])
        assert first.startswith(" ") and spaced(request.target_true or "").startswith(first)


def test_restoring_every_hidden_state_gives_back_p_clean(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerFast
) -> None:
    prompt, blocks, clean, p_clean, noise = _corrupted(model, tokenizer, 4, scale=10.0)
    everything = Restoration(tuple(blocks), tuple(range(prompt.input_ids.shape[0])))
    p_corrupt, p_restored = restored_probs(model, prompt, noise, clean, [Restoration(), everything])
    assert abs(p_clean - float(p_corrupt)) > 1e-3  # the noise does corrupt
    assert float(p_restored) == pytest.approx(p_clean, rel=1e-5)


def test_tokens_before_the_subject_carry_no_effect(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerFast
) -> None:
    prompt, blocks, clean, _, noise = _corrupted(model, tokenizer, 4, scale=10.0)
    assert prompt.subject_first > 0  # "By profession, {} is a"
    before = [Restoration((b,), (t,)) for b in blocks for t in range(prompt.subject_first)]
    probs = restored_probs(model, prompt, noise, clean, [Restoration(), *before], max_batch=8)
    torch.testing.assert_close(probs[1:], probs[0].expand(len(before)), rtol=1e-5, atol=1e-7)


def test_the_last_layer_at_the_last_token_recovers_p_clean(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerFast
) -> None:
    prompt = trace_prompt(tokenizer, fact_requests()[0])
    settings = TraceSettings(samples=3, window=2)
    trace = trace_record(model, prompt, noise_std=0.5, settings=settings,
                         generator=torch.Generator().manual_seed(0))  # fmt: skip
    hidden = trace.effects["hidden"]  # (T, L)
    assert hidden.shape == (prompt.input_ids.shape[0], N_LAYER)
    assert float(hidden[-1, -1]) == pytest.approx(trace.p_clean - trace.p_corrupt, abs=1e-6)
    # the last block's output at an earlier token reaches no later computation
    torch.testing.assert_close(
        hidden[:-1, -1], torch.zeros_like(hidden[:-1, -1]), atol=1e-6, rtol=0
    )
    assert trace.p_clean > 0.5


def test_no_noise_no_effect(model: PreTrainedModel, tokenizer: PreTrainedTokenizerFast) -> None:
    prompt = trace_prompt(tokenizer, fact_requests()[5])
    trace = trace_record(model, prompt, noise_std=0.0, settings=TraceSettings(samples=2),
                         generator=torch.Generator().manual_seed(0))  # fmt: skip
    assert trace.p_corrupt == pytest.approx(trace.p_clean, rel=1e-5)
    for kind in KINDS:
        effects = trace.effects[kind]
        torch.testing.assert_close(effects, torch.zeros_like(effects), atol=1e-6, rtol=0)


def test_token_rows_of_a_hand_made_record() -> None:
    effects = torch.arange(14.0).view(7, 2)  # token t has effects (2t, 2t + 1)
    rows = token_rows(effects, first=1, last=3)
    expected = [[2, 3], [4, 5], [6, 7], [8, 9], [10, 11], [12, 13]]
    assert [row.tolist() for row in rows if row is not None] == expected
    # a one-token subject right before the last token: no middle, no further tokens
    rows = token_rows(torch.arange(6.0).view(3, 2), first=1, last=1)
    assert [None if r is None else r.tolist() for r in rows] == [
        [2, 3], None, [2, 3], [4, 5], None, [4, 5]
    ]  # fmt: skip
    # several middle / further tokens are averaged
    rows = token_rows(torch.arange(9.0).view(9, 1), first=0, last=3)
    assert rows[1].tolist() == [1.5] and rows[4].tolist() == [6.0]  # type: ignore[union-attr]


def test_rows_are_averaged_per_record_then_over_records() -> None:
    one = token_rows(torch.tensor([[1.0], [2], [4], [8], [0], [5], [7]]), first=0, last=3)
    two = token_rows(torch.tensor([[3.0], [9], [6], [1]]), first=0, last=2)  # no further token
    rows, counts = average_rows([one, two])
    assert counts == [2, 2, 2, 2, 1, 2]
    # middle: (mean(2, 4) + 9) / 2 = 6, not the pooled (2 + 4 + 9) / 3 = 5
    assert [row.tolist() for row in rows if row is not None] == [
        [2.0], [6.0], [7.0], [0.5], [5.0], [4.0]
    ]  # fmt: skip


def test_trace_facts_traces_the_known_facts_only(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerFast
) -> None:
    unknown = EditRequest(case_id=10, prompt="{} was born in", subject="Fenna Underhill",
                          target_new="the", target_true="people")  # fmt: skip
    no_target = EditRequest(case_id=11, prompt="{} was born in", subject="Helka Tillman",
                            target_new="the")  # fmt: skip
    calls: list[tuple[int, int]] = []
    settings = TraceSettings(samples=3, window=2, seed=5)
    requests = [*fact_requests(), unknown, no_target]
    result = trace_facts(model, tokenizer, requests, settings,
                         progress=lambda done, total: calls.append((done, total)))  # fmt: skip
    assert (result.n_records, result.n_traced) == (8, 6)
    assert (result.skipped_unknown, result.skipped_no_target) == ([10], [11])
    assert calls == [(i, 6) for i in range(1, 7)]
    assert result.row_labels == list(ROW_LABELS) and result.window == 2
    assert result.row_records == [6, 6, 6, 6, 6, 6]  # every subject has 2+ tokens after it
    for kind in KINDS:
        assert [len(row) for row in result.aie[kind] if row is not None] == [N_LAYER] * 6
        best = result.best_layers[kind]
        assert 0 <= best.last_subject < N_LAYER and 0 <= best.last_token < N_LAYER
    assert result.best_layers["hidden"].last_token == max(
        range(N_LAYER),
        key=lambda layer: result.aie["hidden"][5][layer],  # type: ignore[index]
    )
    assert result.p_clean > 0.5 and result.p_corrupt < result.p_clean
    assert TraceResult.model_validate_json(result.model_dump_json()) == result
    again = trace_facts(model, tokenizer, requests, settings)
    assert again == result  # a fixed seed reproduces the trace
    other = trace_facts(model, tokenizer, requests, settings.model_copy(update={"seed": 6}))
    assert other.p_corrupt != result.p_corrupt


def test_no_known_fact_is_a_clear_error(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerFast
) -> None:
    wrong = [r.model_copy(update={"target_true": "harp"}) for r in fact_requests()]
    with pytest.raises(TraceError) as info:
        trace_facts(model, tokenizer, wrong, TraceSettings(samples=2))
    message = str(info.value)
    assert "none of the 6 records" in message and "case_id=0" in message
    assert "target_true" in message and "Fenna Underhill was born in" in message
