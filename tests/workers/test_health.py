"""Health checks: per-edit and trend checks, their policies, and exact roll-back."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from seqedit.methods.locality import locality_drift, perplexity
from seqedit.pipeline.run.health_steps import retention_sample
from seqedit.schemas.campaign import HealthSpec
from seqedit.testbed.build import load_testbed
from seqedit.workers.edit_log import parse_edit_log
from seqedit.workers.editor import SequentialEditor
from seqedit.workers.health import HealthMonitor, action
from tests.pipeline.rows import edit_row
from tests.workers.test_every_method import QUICK_HPARAMS


def _row(step: int, *, success: bool = True, p_new: float = 0.5, norm: float = 1.0):
    return edit_row(step, step).model_copy(
        update={"success": success, "p_new_after": p_new, "update_norm": norm}
    )


def test_failed_edit_is_recorded_and_a_big_update_skipped() -> None:
    monitor = HealthMonitor(HealthSpec(max_update_norm=10.0, window=3), "c")
    checks = monitor.observe([_row(0, success=False, norm=11.0)])
    by_check = {c.check_name: c for c in checks}
    assert by_check["verified"].action == "record" and not by_check["verified"].passed
    assert by_check["update_norm"].action == "skip" and by_check["update_norm"].value == 11.0
    assert by_check["success_rate"].passed  # the window is not full yet
    assert action(checks) == "skip"


def test_trend_fires_once_the_window_is_full_of_collapse() -> None:
    spec = HealthSpec(window=3, min_target_prob=1e-3, min_success_rate=None)
    monitor = HealthMonitor(spec, "c")
    actions = []
    for step in range(4):
        checks = monitor.observe([_row(step, p_new=1e-5)])
        actions.append(action(checks))
        monitor.keep([_row(step, p_new=1e-5)])
    assert actions == [None, None, "stop", "stop"]
    trend = next(c for c in checks if c.check_name == "target_prob")
    assert trend.value == pytest.approx(1e-5) and trend.threshold == 1e-3


def test_rolled_back_edits_leave_the_window_untouched() -> None:
    monitor = HealthMonitor(HealthSpec(window=2, min_success_rate=0.5), "c")
    monitor.observe([_row(0, success=False)])  # not kept: rolled back by the caller
    checks = monitor.observe([_row(1, success=False)])
    assert next(c for c in checks if c.check_name == "success_rate").passed  # window: 1 of 2


def test_undo_last_restores_the_exact_state_and_the_log_replays(
    tiny_testbed: Path, tiny_stats: Path
) -> None:
    _, requests = load_testbed(tiny_testbed)

    def editor() -> SequentialEditor:
        return SequentialEditor(
            str(tiny_testbed), "alphaedit", QUICK_HPARAMS["alphaedit"],
            stats_dir=str(tiny_stats), campaign="t", keep_undo=True,
        )  # fmt: skip

    edited = editor()
    edited.edit(requests[0], 0)
    before = edited.checkpoint()
    edited.edit(requests[1], 1)
    edited.undo_last()
    after = edited.checkpoint()
    assert before.keys() == after.keys()
    assert all(before[k].equal(after[k]) for k in before if k != "n_steps")
    assert int(after["n_steps"][0]) == 2 and int(after["n_applied"][0]) == 1
    with pytest.raises(ValueError, match="nothing to undo"):
        edited.undo_last()
    edited.edit(requests[2], 2)
    log = edited.take_edit_log()
    assert "step1.rolled_back" in log and parse_edit_log(log)[1] == []

    fresh = editor()
    assert fresh.replay(log) == 3
    assert fresh.weights_fingerprint() == edited.weights_fingerprint()


def test_locality_drift_by_hand() -> None:
    base = torch.log(torch.tensor([[0.5, 0.25, 0.25], [0.1, 0.8, 0.1]]))
    same = locality_drift(base, base)
    assert same.kl == pytest.approx(0.0, abs=1e-7) and same.top1 == 1.0
    edited = torch.log(torch.tensor([[0.25, 0.5, 0.25], [0.1, 0.8, 0.1]]))
    drift = locality_drift(base, edited)
    kl_row0 = 0.5 * math.log(0.5 / 0.25) + 0.25 * math.log(0.25 / 0.5)
    assert drift.kl == pytest.approx(kl_row0 / 2) and drift.top1 == 0.5


def test_perplexity_by_hand_with_padding(tiny_testbed: Path) -> None:
    """Batched and right-padded, it equals exp(mean NLL) of each text scored alone."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_testbed).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_testbed)
    texts = ["Paris is a city in France and it is old.", "The river runs."]
    nll, count = 0.0, 0
    for text in texts:
        ids = torch.tensor([tokenizer.encode(text, add_special_tokens=False)])
        with torch.no_grad():
            logp = torch.log_softmax(model(ids).logits[0, :-1].float(), dim=-1)
        nll -= float(logp.gather(1, ids[0, 1:, None]).sum())
        count += ids.shape[1] - 1
    assert perplexity(model, tokenizer, texts) == pytest.approx(math.exp(nll / count), rel=1e-5)
    with pytest.raises(ValueError, match="no held-out text"):
        perplexity(model, tokenizer, [""])


def test_a_periodic_metric_without_a_limit_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown periodic health metric 'bogus'"):
        HealthMonitor(HealthSpec(), "c").periodic(_row(0), {"bogus": 1.0})


def test_periodic_checks_hold_each_metric_to_its_limit() -> None:
    spec = HealthSpec(min_retention=0.9, max_locality_kl=0.1, max_weight_drift=2.0,
                      on_periodic="stop")  # fmt: skip
    rows = HealthMonitor(spec, "c").periodic(
        _row(9),
        {"retention": 0.95, "locality_kl": 0.5, "locality_top1": 0.2, "weight_drift.m": 3.0},
    )
    by_check = {r.check_name: r for r in rows}
    assert by_check["retention"].passed and by_check["retention"].threshold == 0.9
    assert not by_check["locality_kl"].passed and by_check["locality_kl"].action == "stop"
    assert by_check["locality_top1"].passed  # no limit set: the value is recorded
    assert not by_check["weight_drift.m"].passed
    assert action(rows) == "stop"


def test_retention_sample_spreads_over_the_edits() -> None:
    assert retention_sample(3, 8) == [0, 1, 2]
    assert retention_sample(100, 5) == [0, 25, 50, 74, 99]
    assert retention_sample(10, 1) == [0]
