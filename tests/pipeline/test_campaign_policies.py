"""Campaign options beyond one-edit-per-step: the retry policy, batched steps, perplexity on
held-out text, and one driver per campaign directory."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors.torch import load_file

from seqedit.pipeline.campaign_dir.lock import CampaignBusyError, driver_lock
from seqedit.pipeline.campaign_dir.state import CampaignState
from seqedit.pipeline.results.views import query
from seqedit.pipeline.run.driver import run_campaign
from seqedit.schemas.campaign import load_spec
from seqedit.workers.editor import SequentialEditor
from tests.conftest import TINY_LAYER
from tests.pipeline.specs import write_spec

NO_STEPS = {"layer": TINY_LAYER, "context_templates": ["{}"], "v_num_grad_steps": 1}
"""ROME with one forward pass and no optimiser step: the value shift stays zero, so the
first try of every edit changes nothing and fails verification."""


def _retrying_campaign(
    tmp_path: Path, testbed: Path, stats: Path, n_edits: int, **health: object
) -> CampaignState:
    """A ROME campaign of NO_STEPS edits whose unverified edits are retried."""
    spec = load_spec(write_spec(tmp_path, testbed, stats, n_edits=n_edits, hparams=NO_STEPS,
                                health={"on_unverified": "retry", **health}))  # fmt: skip
    return run_campaign(spec, tmp_path / "c")


@pytest.mark.slow
def test_retry_redoes_a_failing_edit_with_a_larger_step_budget(
    ray_local: None, tiny_testbed: Path, tiny_stats: Path, tmp_path: Path
) -> None:
    state = _retrying_campaign(tmp_path, tiny_testbed, tiny_stats, 4, max_retries=2,
                               retry_steps_factor=16)  # fmt: skip
    assert state.status == "done"
    edits = query(tmp_path / "c", "SELECT step, retries, opt_steps, success, rolled_back "
                  "FROM edits ORDER BY step").to_pylist()  # fmt: skip
    assert [e["step"] for e in edits] == [0, 1, 2, 3]  # one row per edit, whatever the tries
    assert all(e["retries"] >= 1 and e["opt_steps"] > 1 for e in edits)
    kept = [e for e in edits if not e["rolled_back"]]
    assert kept and all(e["success"] for e in kept)
    tries = query(tmp_path / "c", "SELECT step, retry, passed, action FROM health "
                  "WHERE check_name = 'verified' ORDER BY step, retry").to_pylist()  # fmt: skip
    first = [t for t in tries if t["retry"] == 0]
    assert len(first) == 4 and all(not t["passed"] and t["action"] == "retry" for t in first)
    assert len(tries) == 4 + sum(e["retries"] for e in edits)

    # the log holds each step once, so the weights replay from the base model
    replayed = SequentialEditor(str(tiny_testbed), "rome", NO_STEPS,
                                stats_dir=str(tiny_stats), campaign="r")  # fmt: skip
    replayed.replay(load_file(tmp_path / "c" / "editlog" / "shard=0.safetensors"))
    assert replayed.weights_fingerprint() == state.shards[0].weights_fingerprint


@pytest.mark.slow
def test_retries_that_all_fail_roll_the_edit_back(
    ray_local: None, tiny_testbed: Path, tiny_stats: Path, tmp_path: Path
) -> None:
    state = _retrying_campaign(tmp_path, tiny_testbed, tiny_stats, 3, max_retries=1,
                               retry_steps_factor=1)  # fmt: skip
    base = SequentialEditor(str(tiny_testbed), "rome", NO_STEPS,
                            stats_dir=str(tiny_stats), campaign="b")  # fmt: skip
    assert state.shards[0].weights_fingerprint == base.weights_fingerprint()
    rows = query(tmp_path / "c", "SELECT retry, action FROM health WHERE check_name = "
                 "'verified' ORDER BY step, retry").to_pylist()  # fmt: skip
    assert rows == [{"retry": 0, "action": "retry"}, {"retry": 1, "action": "skip"}] * 3
    back = query(tmp_path / "c", "SELECT bool_and(rolled_back) AS b FROM edits").to_pylist()
    assert back == [{"b": True}]


@pytest.mark.slow
def test_edits_per_step_applies_batches_as_one_step(
    ray_local: None, tiny_testbed: Path, tiny_stats: Path, tmp_path: Path
) -> None:
    hparams = {"layers": [TINY_LAYER], "v_loss_layer": 3, "mom2_update_weight": 1000}
    spec = load_spec(write_spec(tmp_path, tiny_testbed, tiny_stats, method="memit",
                                hparams=hparams, n_edits=7, edits_per_step=3, shard_size=2,
                                health={"every": 3, "n_probes": 4}))  # fmt: skip
    assert spec.n_steps == 3
    state = run_campaign(spec, tmp_path / "c")
    assert state.status == "done" and [(s.start, s.stop) for s in state.shards] == [(0, 2), (2, 3)]
    steps = query(tmp_path / "c", "SELECT step FROM edits ORDER BY case_id").to_pylist()
    assert [r["step"] for r in steps] == [0, 0, 0, 1, 1, 1, 2]
    evals = query(tmp_path / "c", "SELECT n_edits_applied, edit_step FROM evals "
                  "ORDER BY case_id").to_pylist()  # fmt: skip
    assert evals == [{"n_edits_applied": 7, "edit_step": s["step"]} for s in steps]
    periodic = query(tmp_path / "c", "SELECT DISTINCT step FROM health "
                     "WHERE check_name = 'locality_kl' ORDER BY step").to_pylist()  # fmt: skip
    assert periodic == [{"step": 0}, {"step": 1}]  # edit counts 3 and 6; 7 crosses no multiple
    replayed = SequentialEditor(str(tiny_testbed), "memit", hparams,
                                stats_dir=str(tiny_stats), campaign="r")  # fmt: skip
    for shard in state.shards:
        replayed.replay(load_file(tmp_path / "c" / "editlog" / f"shard={shard.index}.safetensors"))
    assert replayed.weights_fingerprint() == state.shards[-1].weights_fingerprint


def test_a_one_at_a_time_method_cannot_batch(tiny_testbed: Path, tmp_path: Path) -> None:
    spec = load_spec(write_spec(tmp_path, tiny_testbed, None, n_edits=4, edits_per_step=2))
    with pytest.raises(ValueError, match="edits one request at a time"):
        run_campaign(spec, tmp_path / "c")
    assert not (tmp_path / "c").exists()


@pytest.mark.slow
def test_periodic_checks_track_held_out_perplexity(
    ray_local: None, tiny_testbed: Path, tiny_stats: Path, tmp_path: Path
) -> None:
    heldout = tmp_path / "heldout.jsonl"
    texts = ["Paris is a city in France.", "The river runs to the sea.", "x"]
    heldout.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    health = {"every": 2, "n_probes": 4, "heldout": "heldout.jsonl", "max_perplexity_ratio": 1.0}
    spec = load_spec(write_spec(tmp_path, tiny_testbed, tiny_stats, n_edits=4, health=health))
    assert spec.health.heldout == str(heldout)  # resolved against the spec's folder
    run_campaign(spec, tmp_path / "c")
    sql = ("SELECT step, check_name, value, threshold, passed FROM health "
           "WHERE check_name LIKE 'perplexity%' ORDER BY step, check_name")  # fmt: skip
    rows = query(tmp_path / "c", sql).to_pylist()
    assert [(r["step"], r["check_name"]) for r in rows] == [
        (1, "perplexity"), (1, "perplexity_ratio"), (3, "perplexity"), (3, "perplexity_ratio")
    ]  # fmt: skip
    ppl, ratio = rows[2], rows[3]
    assert ppl["value"] > 1 and ratio["threshold"] == 1.0
    assert ratio["passed"] == (ratio["value"] <= 1.0) and ratio["value"] != 1.0


def test_a_second_driver_on_the_same_directory_is_refused(
    tiny_testbed: Path, tmp_path: Path
) -> None:
    spec = load_spec(write_spec(tmp_path, tiny_testbed, None, n_edits=2))
    campaign = tmp_path / "c"
    campaign.mkdir()
    with driver_lock(campaign), pytest.raises(CampaignBusyError, match="is running this"):
        run_campaign(spec, campaign)
