"""The MEND trainer without Ray: it learns, N workers take one worker's steps, and a saved
state resumes to the same weights."""

from __future__ import annotations

import pytest
import torch
from transformers import GPT2LMHeadModel, PreTrainedTokenizerFast

from seqedit.methods.mend import MendNetworkConfig
from seqedit.methods.mend_loss import MendLossConfig
from seqedit.schemas.requests import EditRequest, LocalityPrompt
from seqedit.workers.mend_trainer import MendTrainer, MendTrainingConfig
from tests.methods.tiny import tiny_gpt2, tiny_tokenizer
from tests.workers.thread_workers import two_thread_workers

PEOPLE = ["Fenna Underhill", "Helka Tillman", "Kelvin Everly", "Dovana Ravensworth"]
PLACES = ["Corvale", "Kyrosoft", "the north", "the harp"]


def _requests() -> list[EditRequest]:
    requests = []
    for i, (person, place) in enumerate((p, q) for p in PEOPLE for q in PLACES[:2]):
        requests.append(
            EditRequest(
                case_id=i,
                prompt="{} was born in",
                subject=person,
                target_new=place,
                paraphrase_prompts=[f"In the evenings, {person} was born in"],
                neighborhood_prompts=[
                    LocalityPrompt(prompt=f"{PEOPLE[(i + 1) % 4]} plays", target="the harp")
                ],
            )
        )
    return requests


CONFIG = MendTrainingConfig(
    network=MendNetworkConfig(rank=4, edit_lr=0.5),
    loss=MendLossConfig(c_edit=1.0, c_loc=1.0),
    last_blocks=2,
    lr=1e-2,
    lr_lr=1e-2,
    batch_size=4,
)


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def model(tokenizer: PreTrainedTokenizerFast) -> GPT2LMHeadModel:
    return tiny_gpt2(len(tokenizer))


def _flat(trainer: MendTrainer) -> torch.Tensor:
    return torch.cat([t.flatten().double() for t in trainer.editor.state_dict().values()])


def test_training_lowers_the_validation_loss(
    model: GPT2LMHeadModel, tokenizer: PreTrainedTokenizerFast
) -> None:
    requests = _requests()
    trainer = MendTrainer(model, tokenizer, CONFIG, requests)
    before = trainer.validate(requests)
    for _ in range(20):
        metrics = trainer.train_step()
    after = trainer.validate(requests)
    rates = {f"lr/edit.{i}" for i in range(len(trainer.editor.edit_lrs))}
    assert trainer.step == 20 and set(metrics) == set(before) | rates
    # a random 2-block model moves slowly (5.47 -> 5.34 measured); constant without learning
    assert after["loss/total"] < before["loss/total"] - 0.08, (before, after)
    assert int(trainer.editor.transforms["128x32"].standardiser.count) > 0


def test_two_workers_take_the_steps_of_one(
    model: GPT2LMHeadModel, tokenizer: PreTrainedTokenizerFast
) -> None:
    requests = _requests()
    single = MendTrainer(model, tokenizer, CONFIG, requests)
    single_metrics = [single.train_step() for _ in range(4)]

    pair, metrics = two_thread_workers(
        lambda comm: MendTrainer(tiny_gpt2(len(tokenizer)), tokenizer, CONFIG, requests, comm), 4
    )
    assert torch.equal(_flat(pair[0]), _flat(pair[1]))  # workers stay identical
    torch.testing.assert_close(_flat(pair[0]), _flat(single), rtol=1e-4, atol=1e-6)
    for got, expected in zip(metrics[0], single_metrics, strict=True):
        assert got == pytest.approx(expected, rel=1e-4, abs=1e-6)


def test_a_saved_state_resumes_to_the_same_weights(
    model: GPT2LMHeadModel, tokenizer: PreTrainedTokenizerFast
) -> None:
    requests = _requests()
    straight = MendTrainer(model, tokenizer, CONFIG, requests)
    for _ in range(4):
        straight.train_step()
    first = MendTrainer(model, tokenizer, CONFIG, requests)
    for _ in range(2):
        first.train_step()
    resumed = MendTrainer(model, tokenizer, CONFIG, requests)
    resumed.load_state_dict(first.state_dict())
    for _ in range(2):
        resumed.train_step()
    assert resumed.step == 4
    assert torch.equal(_flat(resumed), _flat(straight))
