"""The evaluator: replaying the edit log reproduces the editor's model, every protocol
scores each record at its step, and the metrics equal values computed by hand."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from seqedit.methods.fluency import fluency
from seqedit.methods.generation import generate_texts
from seqedit.methods.metrics import agreement, mean
from seqedit.methods.scoring import score_targets
from seqedit.schemas.requests import EditRequest, LocalityPrompt
from seqedit.testbed.build import load_testbed
from seqedit.workers.edit_log import parse_edit_log
from seqedit.workers.editor import SequentialEditor
from seqedit.workers.evaluator import EvalTask, Evaluator, neighbour_predictions
from tests.conftest import TINY_LAYER

HPARAMS = {"layer": TINY_LAYER, "context_template_length_params": [[5, 2], [10, 2]]}
N = 4
FLOAT_FIELDS = ("es", "ps", "ns", "em", "pm", "nm", "rewrite_acc", "rephrase_acc", "locality_acc")


@pytest.fixture(scope="module")
def edited(tiny_testbed: Path, tiny_stats: Path) -> tuple[list[EditRequest], dict, list]:
    """N ROME edits on the testbed: the requests, the edit log, and the editor's own rows
    for each record right after its edit and for all of them after the last."""
    _, requests = load_testbed(tiny_testbed)
    requests = requests[:N]
    editor = SequentialEditor(
        str(tiny_testbed), "rome", HPARAMS, stats_dir=str(tiny_stats), campaign="t", seed=0
    )
    immediate = []
    for step, request in enumerate(requests):
        editor.edit(request, step)
        immediate += editor.evaluate([request], [step], protocol="immediate")
    final = editor.evaluate(requests, list(range(N)), protocol="final")
    return requests, editor.take_edit_log(), [immediate, final, editor.weights_fingerprint()]


def _evaluator(tiny_testbed: Path, **kwargs: object) -> Evaluator:
    return Evaluator(str(tiny_testbed), "rome", HPARAMS, campaign="t", **kwargs)  # type: ignore[arg-type]


def _task(requests: list[EditRequest], after: list[int], protocol: str = "final") -> EvalTask:
    return EvalTask(
        protocol=protocol,  # type: ignore[arg-type]
        requests=requests,
        edit_steps=list(range(len(requests))),
        scored_after=after,
        n_edits_applied=after,
    )


def _same_metrics(ours: list, theirs: list) -> None:
    assert [r.case_id for r in ours] == [r.case_id for r in theirs]
    for a, b in zip(ours, theirs, strict=True):
        assert (a.protocol, a.n_edits_applied, a.edit_step) == (b.protocol, b.n_edits_applied,
                                                                 b.edit_step)  # fmt: skip
        for name in FLOAT_FIELDS:
            assert getattr(a, name) == getattr(b, name), name  # same weights: bit-identical


def test_replay_reproduces_the_editors_rows(tiny_testbed: Path, edited) -> None:
    requests, log, (immediate, final, fingerprint) = edited
    steps = parse_edit_log(log)
    evaluator = _evaluator(tiny_testbed)
    result = evaluator.run(_task(requests, [N] * N), steps)
    assert evaluator.edited.fingerprint() == fingerprint
    assert result.replayed_steps == N
    _same_metrics(result.rows, final)
    # immediate: each record right after its own step, from a fresh evaluator
    again = _evaluator(tiny_testbed).run(_task(requests, [1, 2, 3, 4], "immediate"), steps)
    _same_metrics(again.rows, immediate)


def test_going_back_resets_and_rolled_back_steps_do_not_count(tiny_testbed: Path, edited) -> None:
    requests, log, (immediate, _, _) = edited
    steps = parse_edit_log(log)
    evaluator = _evaluator(tiny_testbed)
    evaluator.run(_task(requests, [N] * N), steps)
    back = evaluator.run(_task(requests[:1], [1], "immediate"), steps)  # step 1 < N: reset
    assert back.replayed_steps == 1
    _same_metrics(back.rows, immediate[:1])
    undone = {**steps, 1: []}  # step 1 rolled back by a health policy
    fresh = _evaluator(tiny_testbed)
    rows = fresh.run(_task(requests, [N] * N), undone).rows
    assert {r.n_edits_applied for r in rows} == {N - 1}


def test_advance_refuses_a_log_with_a_gap(tiny_testbed: Path, edited) -> None:
    requests, log, _ = edited
    steps = parse_edit_log(log)
    del steps[2]
    with pytest.raises(ValueError, match=r"edit log lacks steps \[2\]"):
        _evaluator(tiny_testbed).run(_task(requests, [N] * N), steps)


def test_token_accuracies_and_agreement_by_hand(tiny_testbed: Path, edited) -> None:
    requests, log, _ = edited
    record = requests[0].model_copy(
        update={"portability_prompts": [LocalityPrompt(prompt="Where is it", target="Paris")]}
    )
    evaluator = _evaluator(tiny_testbed)
    base = neighbour_predictions(evaluator.model, evaluator.tokenizer, [record])[0]
    (at_base,) = evaluator.run(_task([record], [0]), {}).rows
    assert at_base.locality_agreement == 1.0  # the base model agrees with itself
    (row,) = evaluator.run(_task([record], [N]), parse_edit_log(log)).rows
    model, tok = evaluator.model, evaluator.tokenizer
    para = score_targets(model, tok, record.paraphrase_prompts,
                         [record.target_new] * len(record.paraphrase_prompts))  # fmt: skip
    near = record.neighborhood_prompts
    nb = score_targets(model, tok, [n.prompt for n in near], [n.target for n in near])
    port = score_targets(model, tok, ["Where is it"], ["Paris"])
    assert row.rephrase_acc == pytest.approx(mean([s.token_accuracy for s in para]), abs=1e-12)
    assert row.locality_acc == pytest.approx(mean([s.token_accuracy for s in nb]), abs=1e-12)
    assert row.portability_acc == port[0].token_accuracy
    assert row.locality_agreement == agreement(base, [s.predicted for s in nb])
    assert (row.n_portability, row.fluency) == (1, None)


def test_agreement_and_mean_hand_cases() -> None:
    assert agreement([(1, 2), (3,)], [(1, 5), (3,)]) == pytest.approx((0.5 + 1.0) / 2)
    assert agreement([], []) is None and mean([]) is None
    with pytest.raises(ValueError, match="do not align"):
        agreement([(1, 2)], [(1,)])


def test_fluency_of_sampled_records_is_reproducible(tiny_testbed: Path, edited) -> None:
    requests, log, _ = edited
    steps = parse_edit_log(log)
    chosen = requests[0]
    assert chosen.generation_prompts, "the testbed's records carry generation prompts"
    task = _task(requests, [N] * N).model_copy(update={"fluency_case_ids": [chosen.case_id]})
    rows = _evaluator(tiny_testbed, fluency_tokens=12).run(task, steps).rows
    assert [r.fluency is not None for r in rows] == [True] + [False] * (N - 1)
    again = _evaluator(tiny_testbed, fluency_tokens=12).run(task, steps).rows
    assert rows[0].fluency == again[0].fluency  # any evaluator draws the same texts
    evaluator = _evaluator(tiny_testbed, fluency_tokens=12)
    evaluator.advance(steps, N)
    texts = generate_texts(
        evaluator.model,
        evaluator.tokenizer,
        chosen.generation_prompts,
        max_new_tokens=12,
        generator=torch.Generator().manual_seed(0 + 1_000_003 * chosen.case_id + N),
    )
    assert rows[0].fluency == fluency(texts)


def test_perplexity_row_on_request(tiny_testbed: Path, edited) -> None:
    requests, log, _ = edited
    evaluator = _evaluator(tiny_testbed, heldout=["the cat sat on the mat", "a b c"])
    task = _task(requests, [N] * N).model_copy(update={"perplexity": True})
    (row,) = evaluator.run(task, parse_edit_log(log)).model_rows
    assert (row.metric, row.n_items, row.n_edits_applied) == ("perplexity", 2, N)
    assert row.value > 1
