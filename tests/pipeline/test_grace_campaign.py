"""GRACE through the whole pipeline: its memory is checkpointed, fingerprinted and replayed,
a killed editor resumes to the same result, and the evaluators score the memory (not the
base model)."""

from __future__ import annotations

from pathlib import Path

import pytest

from seqedit.pipeline.campaign_dir.state import CampaignState
from seqedit.pipeline.results.views import query
from seqedit.pipeline.run.driver import run_campaign
from seqedit.schemas.campaign import load_spec
from seqedit.testbed.build import load_testbed
from seqedit.workers.edit_log import read_edit_log
from seqedit.workers.editor import SequentialEditor
from tests.conftest import TINY_LAYER
from tests.pipeline.specs import write_spec
from tests.pipeline.test_campaign_integration import (
    FAULT_HEALTH,
    assert_same_rows,
    run_with_editor_killed,
)

GRACE_HPARAMS = {"layer": TINY_LAYER + 1, "eps_init": 1.0, "n_iter": 30, "edit_lr": 1.0}
N_EDITS = 12


def _spec(tmp_path: Path, testbed: Path, **overrides: object) -> Path:
    fields = {
        "name": "it-grace", "method": "grace", "hparams": GRACE_HPARAMS, "n_edits": N_EDITS,
        "shard_size": 6, "eval_every": 6, "evaluation": {"immediate": True},
        "health": {**FAULT_HEALTH, "max_update_norm": 1.0},
    }  # fmt: skip
    return write_spec(tmp_path, testbed, None, **(fields | overrides))


@pytest.mark.slow
def test_a_killed_grace_editor_resumes_to_the_uninterrupted_result(
    ray_local: None, tiny_testbed: Path, tmp_path: Path
) -> None:
    spec = load_spec(_spec(tmp_path, tiny_testbed))
    reference = run_campaign(spec, tmp_path / "reference")
    state, killed_pid = run_with_editor_killed(spec, tmp_path / "killed", shard=1, after_steps=3)
    assert isinstance(state, CampaignState) and state.status == "done"
    assert state.shards[1].attempt == 1 and state.shards[1].worker_pid != killed_pid
    assert [s.weights_fingerprint for s in state.shards] == [
        s.weights_fingerprint for s in reference.shards
    ]
    assert_same_rows(tmp_path / "killed", tmp_path / "reference")

    # what GRACE records instead of weight checks
    edits = query(tmp_path / "reference", "SELECT modules, update_norm, weight_drift, "
                  "memory_size FROM edits ORDER BY step").to_pylist()  # fmt: skip
    assert {(e["modules"], e["update_norm"], e["weight_drift"]) for e in edits} == {
        ("", None, None)
    }
    sizes = [e["memory_size"] for e in edits]
    assert sizes == sorted(sizes) and 1 <= sizes[-1] <= N_EDITS
    checks = query(tmp_path / "reference", "SELECT DISTINCT check_name FROM health")
    names = set(checks.column("check_name").to_pylist())
    assert "update_norm" not in names and "memory_size" in names  # skipped by name
    assert not any(name.startswith("weight_drift.") for name in names)


@pytest.mark.slow
def test_the_evaluators_score_the_memory_as_the_editor_does(
    ray_local: None, tiny_testbed: Path, tmp_path: Path
) -> None:
    spec = load_spec(_spec(tmp_path, tiny_testbed))
    run_campaign(spec, tmp_path / "c")
    campaign = tmp_path / "c"

    # right after each edit: the evaluators' ES is the editor's own verification
    immediate = query(
        campaign,
        "SELECT e.case_id, v.es, e.success FROM edits e JOIN evals v "
        "ON v.case_id = e.case_id AND v.protocol = 'immediate' ORDER BY 1",
    )
    pairs = [(row["es"], float(row["success"])) for row in immediate.to_pylist()]
    assert len(pairs) == N_EDITS and all(es == success for es, success in pairs)

    # after all edits: the evaluators' final ES is an editor's, replaying the same log
    editor = SequentialEditor(str(spec.model), "grace", GRACE_HPARAMS, stats_dir=None,
                              campaign=spec.name)  # fmt: skip
    shards = CampaignState.load(campaign).shards
    for shard in shards:
        editor.replay(read_edit_log(campaign / "editlog" / f"shard={shard.index}.safetensors"))
    assert editor.weights_fingerprint() == shards[-1].weights_fingerprint
    _, requests = load_testbed(tiny_testbed)
    own = editor.evaluate(requests[:N_EDITS], list(range(N_EDITS)), protocol="retention")
    scored = query(campaign, "SELECT case_id, es FROM evals WHERE protocol = 'final' AND "
                   f"n_edits_applied = {N_EDITS} ORDER BY case_id").to_pylist()  # fmt: skip
    assert [(r["case_id"], r["es"]) for r in scored] == [(r.case_id, r.es) for r in own]
    assert sum(r.es for r in own) / N_EDITS >= 0.5  # the memory answers, not the base model
