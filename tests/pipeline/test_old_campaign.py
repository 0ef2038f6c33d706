"""A campaign directory written by the release before edit contract v2 (tests/fixtures/
campaign_v1: edit log v1, rows with `layers`) still queries, rebuilds and reruns."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from seqedit.pipeline.campaign_dir.state import CampaignState
from seqedit.pipeline.cli.campaign_ops import SPEC_FILE, frozen_spec, rebuild_model, rerun_campaign
from seqedit.pipeline.results.views import query
from seqedit.schemas.campaign import CampaignSpec
from seqedit.workers.edit_log import EDIT_LOG_VERSION, read_edit_log
from seqedit.workers.tensor_files import read_safetensors

FIXTURE = Path(__file__).parents[1] / "fixtures" / "campaign_v1"


def relocated_copy(tmp_path: Path) -> Path:
    """A copy of the fixture whose frozen spec points at the copy's model, data and stats
    (the spec hash in spec.yaml and state.json follows); everything else as written."""
    root = tmp_path / "v1"
    shutil.copytree(FIXTURE, root)
    campaign = root / "campaign"
    raw = yaml.safe_load((campaign / SPEC_FILE).read_text())
    old_hash = raw.pop("spec_hash")
    raw["model"], raw["stats"] = str(root / "model"), str(root / "stats")
    raw["dataset"]["path"] = str(root / "model" / "requests.jsonl")
    spec = CampaignSpec.model_validate(raw)
    (campaign / SPEC_FILE).write_text(yaml.safe_dump({"spec_hash": spec.spec_hash(), **raw}))
    state = json.loads((campaign / "state.json").read_text())
    assert state["spec_hash"] == old_hash
    state["spec_hash"] = spec.spec_hash()
    (campaign / "state.json").write_text(json.dumps(state))
    return campaign


def test_the_fixture_is_a_v1_campaign() -> None:
    _, metadata = read_safetensors(FIXTURE / "campaign" / "editlog" / "shard=0.safetensors")
    assert "editlog_version" not in metadata and EDIT_LOG_VERSION > 1
    read_edit_log(FIXTURE / "campaign" / "editlog" / "shard=0.safetensors")  # reads as v1


def test_an_old_campaign_queries(tmp_path: Path) -> None:
    campaign = relocated_copy(tmp_path)
    edits = query(campaign, "SELECT step, layers, modules, update_norm FROM edits ORDER BY step")
    assert edits.column("step").to_pylist() == list(range(6))
    assert set(edits.column("layers").to_pylist()) == {"0"}
    assert set(edits.column("modules").to_pylist()) == {None}  # not a column back then
    assert all(norm > 0 for norm in edits.column("update_norm").to_pylist())
    curves = query(campaign, "SELECT protocol, n_edits_applied, es FROM curves ORDER BY ALL")
    assert ("final", 6) in {(r["protocol"], r["n_edits_applied"]) for r in curves.to_pylist()}
    periodic = query(campaign, "SELECT memory_size FROM periodic")
    assert set(periodic.column("memory_size").to_pylist()) <= {None}


def test_an_old_campaign_rebuilds_to_its_recorded_fingerprints(tmp_path: Path) -> None:
    campaign = relocated_copy(tmp_path)
    state = CampaignState.load(campaign)
    for shard in state.shards:  # rebuild checks the shard fingerprint where a shard ends
        fingerprint = rebuild_model(campaign, shard.stop - 1, tmp_path / f"model{shard.index}")
        assert fingerprint == shard.weights_fingerprint
    assert (tmp_path / "model1" / "model.safetensors").exists()


@pytest.mark.slow
def test_an_old_campaign_reruns_a_shard_to_the_same_weights_and_rows(
    ray_local: None, tmp_path: Path
) -> None:
    campaign = relocated_copy(tmp_path)
    before = CampaignState.load(campaign).shards[1]
    metrics = "step, case_id, p_new_before, p_new_after, success, loss, opt_steps, update_norm"
    old_rows = query(campaign, f"SELECT {metrics} FROM edits WHERE step >= 3 ORDER BY step")
    old_evals = query(campaign, "SELECT * EXCLUDE (attempt, node) FROM evals ORDER BY ALL")

    state = rerun_campaign(campaign, shards=[1])

    after = state.shards[1]
    assert after.status == "done" and after.attempt == before.attempt + 1
    assert after.weights_fingerprint == before.weights_fingerprint
    assert query(campaign, f"SELECT {metrics} FROM edits WHERE step >= 3 ORDER BY step").equals(
        old_rows
    )
    modules = query(campaign, "SELECT DISTINCT modules FROM edits WHERE step >= 3")
    assert modules.column("modules").to_pylist() == ["transformer.h.0.mlp.c_proj"]
    assert query(campaign, "SELECT * EXCLUDE (attempt, node) FROM evals ORDER BY ALL").equals(
        old_evals
    )
    _, metadata = read_safetensors(campaign / "editlog" / "shard=1.safetensors")
    assert metadata["editlog_version"] == str(EDIT_LOG_VERSION)  # rewritten in the new format
    assert frozen_spec(campaign).method == "rome"
