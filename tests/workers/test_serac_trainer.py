"""The SERAC trainer without Ray: it learns, 2 workers take one worker's steps, a saved state
resumes to the same parts, and its parts edit through `method: serac`."""

from __future__ import annotations

import pytest
import torch
from transformers import PreTrainedTokenizerFast

from seqedit.methods.serac import SERAC
from seqedit.methods.serac_scope import ScopeConfig
from seqedit.workers.serac_trainer import SeracTrainer, SeracTrainingConfig
from tests.methods.tiny import tiny_gpt2, tiny_tokenizer
from tests.workers.test_mend_trainer import _requests
from tests.workers.thread_workers import two_thread_workers

CONFIG = SeracTrainingConfig(scope=ScopeConfig(dim=8), lr=1e-2, cf_lr=1e-3, batch_size=4)


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    return tiny_tokenizer()


def _flat(trainer: SeracTrainer) -> torch.Tensor:
    state = trainer.state_dict()
    tensors = [*state["classifier"].values(), *state["counterfactual"].values()]
    return torch.cat([t.flatten().double() for t in tensors if t.is_floating_point()])


def test_training_lowers_the_validation_loss(tokenizer: PreTrainedTokenizerFast) -> None:
    requests = _requests()
    trainer = SeracTrainer(tiny_gpt2(len(tokenizer)), tokenizer, CONFIG, requests)
    before = trainer.validate(requests)
    for _ in range(12):
        metrics = trainer.train_step()
    after = trainer.validate(requests)
    assert trainer.step == 12
    assert set(metrics) == set(before) | {"lr/classifier", "lr/counterfactual"}
    assert after["loss/total"] < before["loss/total"] - 0.5, (before, after)


def test_two_workers_take_the_steps_of_one(tokenizer: PreTrainedTokenizerFast) -> None:
    requests = _requests()
    single = SeracTrainer(tiny_gpt2(len(tokenizer)), tokenizer, CONFIG, requests)
    single_metrics = [single.train_step() for _ in range(3)]
    pair, metrics = two_thread_workers(
        lambda comm: SeracTrainer(tiny_gpt2(len(tokenizer)), tokenizer, CONFIG, requests, comm), 3
    )
    assert torch.equal(_flat(pair[0]), _flat(pair[1]))
    torch.testing.assert_close(_flat(pair[0]), _flat(single), rtol=1e-4, atol=1e-6)
    for got, expected in zip(metrics[0], single_metrics, strict=True):
        assert got == pytest.approx(expected, rel=1e-4, abs=1e-6)


def test_a_saved_state_resumes_and_its_parts_edit(tokenizer: PreTrainedTokenizerFast) -> None:
    requests = _requests()
    straight = SeracTrainer(tiny_gpt2(len(tokenizer)), tokenizer, CONFIG, requests)
    for _ in range(4):
        straight.train_step()
    first = SeracTrainer(tiny_gpt2(len(tokenizer)), tokenizer, CONFIG, requests)
    for _ in range(2):
        first.train_step()
    resumed = SeracTrainer(tiny_gpt2(len(tokenizer)), tokenizer, CONFIG, requests)
    resumed.load_state_dict(first.state_dict())
    for _ in range(2):
        resumed.train_step()
    assert resumed.step == 4
    torch.testing.assert_close(_flat(resumed), _flat(straight))

    base = tiny_gpt2(len(tokenizer))
    parts = straight.parts()
    context = SERAC.prepare(base, tokenizer, SERAC.config_cls(), None, None, parts)
    cf_state = context.counterfactual.state_dict()
    for name, tensor in straight.counterfactual.state_dict().items():
        assert torch.equal(cf_state[name], tensor)
    with pytest.raises(ValueError, match="at least two training requests"):
        SeracTrainer(base, tokenizer, CONFIG, requests[:1])
