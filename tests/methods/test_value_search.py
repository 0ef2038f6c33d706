"""Value searches that share forward passes (`optimize_values` on a batch) find what each
search finds alone: every request keeps its own delta, Adam state, loss and stop; and MEMIT's
keys and bare-prompt outputs read from one forward pass equal their own passes."""

from __future__ import annotations

import pytest
import torch
from transformers import GPT2LMHeadModel, PreTrainedTokenizerFast

from seqedit.methods.arch import get_module, module_names_for
from seqedit.methods.keys_values import (
    grouped_keys,
    keys_and_bare_outputs,
    module_io_at_subjects,
)
from seqedit.methods.value_search import ValueResult, ValueSearch, optimize_values
from seqedit.schemas.requests import EditRequest
from tests.methods.tiny import tiny_gpt2

TEMPLATES = ["{}", "The city lies in the north. {}", "In the evenings. {}"]
REQUESTS = [
    EditRequest(case_id=0, prompt="{} was born in", subject="Fenna Underhill",
                target_new="Kyrosoft"),
    EditRequest(case_id=1, prompt="{} works for", subject="Helka Tillman", target_new="Corvale"),
    EditRequest(case_id=2, prompt="{} plays the", subject="Kelvin Everly", target_new="harp"),
    EditRequest(case_id=3, prompt="By profession, {} is a", subject="Dovana Ravensworth",
                target_new="lawyer people"),
]  # fmt: skip
LAYER = 1


@pytest.fixture(scope="module")
def model(tokenizer: PreTrainedTokenizerFast) -> GPT2LMHeadModel:
    """With its (tied) embeddings scaled up, so that its logits respond to the shift."""
    net = tiny_gpt2(len(tokenizer), n_layer=3)
    with torch.no_grad():
        net.transformer.wte.weight.mul_(30)
    return net


def _search(
    model: GPT2LMHeadModel,
    tokenizer: PreTrainedTokenizerFast,
    requests: list[EditRequest],
    batch_rows: int = 512,
) -> list[ValueResult]:
    names = module_names_for(model)
    search = ValueSearch(
        fact_token="last", num_steps=12, lr=1.0, weight_decay=0.0, clamp_norm_factor=100.0,
        kl_factor=0.0625, early_stop_loss=15.0, batch_rows=batch_rows,
    )  # fmt: skip
    return optimize_values(
        model, tokenizer, requests, TEMPLATES, names=names,
        edit_module=names.layer_module_tmp.format(LAYER), dim=32, search=search,
        loss_module=names.layer_module_tmp.format(2),
        reuse_outputs_of=[names.layer_module_tmp.format(LAYER)], replay_from=LAYER,
    )  # fmt: skip


def _assert_same(together: list[ValueResult], alone: list[ValueResult]) -> None:
    for a, b in zip(together, alone, strict=True):
        assert a.steps == b.steps
        torch.testing.assert_close(a.init, b.init, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(a.delta, b.delta, rtol=1e-4, atol=1e-5)
        assert a.loss == pytest.approx(b.loss, rel=1e-4, abs=1e-6)
        assert a.initial_target_prob == pytest.approx(b.initial_target_prob, rel=1e-5)


def test_batched_searches_equal_separate_ones(
    model: GPT2LMHeadModel, tokenizer: PreTrainedTokenizerFast
) -> None:
    alone = [_search(model, tokenizer, [request])[0] for request in REQUESTS]
    # the searches stop at different steps, so the batch goes on after some have stopped
    assert len({result.steps for result in alone}) > 1, [r.steps for r in alone]
    assert all(result.delta.norm() > 0 for result in alone)
    _assert_same(_search(model, tokenizer, REQUESTS), alone)
    # 4 rows a request (3 templates + 1 KL prompt): groups of 2 requests, then of 1
    _assert_same(_search(model, tokenizer, REQUESTS, batch_rows=8), alone)
    _assert_same(_search(model, tokenizer, REQUESTS, batch_rows=1), alone)
    assert "forward" not in get_module(model, "transformer.h.0").__dict__  # restored


def test_keys_and_bare_outputs_equal_their_own_forward_passes(
    model: GPT2LMHeadModel, tokenizer: PreTrainedTokenizerFast
) -> None:
    groups = [["{}"], TEMPLATES[1:]]
    names = module_names_for(model)
    module, block = names.rewrite_module_tmp.format(1), names.layer_module_tmp.format(2)
    keys, bare = keys_and_bare_outputs(
        model, tokenizer, REQUESTS, (module, block), groups, "subject_last"
    )
    _, alone = module_io_at_subjects(
        model, tokenizer, [r.prompt for r in REQUESTS], [r.subject for r in REQUESTS], block,
        "subject_last",
    )  # fmt: skip
    torch.testing.assert_close(bare, alone, rtol=1e-5, atol=1e-6)
    expected = grouped_keys(model, tokenizer, REQUESTS, module, groups, "subject_last")
    torch.testing.assert_close(keys, expected, rtol=0, atol=0)
    with pytest.raises(ValueError, match="first template group"):
        keys_and_bare_outputs(
            model, tokenizer, REQUESTS, (module, block), groups[::-1], "subject_last"
        )
