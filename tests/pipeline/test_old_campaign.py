"""A campaign directory written by the release before edit contract v2 (tests/fixtures/
campaign_v1: edit log v1, rows with `layers`) still queries, rebuilds and reruns."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from seqedit.pipeline.campaign_dir.state import CampaignState
from seqedit.pipeline.cli.campaign_ops import SPEC_FILE, frozen_spec, rebuild_model, rerun_campaign
from seqedit.pipeline.results.views import query
from seqedit.schemas.campaign import CampaignSpec
from seqedit.workers.edit_log import EDIT_LOG_VERSION, read_edit_log
from seqedit.workers.tensor_files import read_safetensors

FIXTURE = Path(__file__).parents[1] / "fixtures" / "campaign_v1"
REL_TOL = 1e-2
"""Another CPU's float32 C^-1 differs by ~3e-4 (tests/methods/test_rome_golden.py), which the
edits carry into their deltas: the rerun's edits are compared to the recorded ones at this
share of the largest delta entry (a wrong edit is off by about 1)."""


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
    """The rerun recomputes the shard's edits: the same weights and rows to float rounding.
    Bit for bit only on the CPU that recorded the fixture (its float32 kernels' rounding
    is the CPU's), so the weights are compared as rebuilt from the old and the new log."""
    campaign = relocated_copy(tmp_path)
    before = CampaignState.load(campaign).shards[1]
    metrics = "step, case_id, p_new_before, p_new_after, success, loss, opt_steps, update_norm"
    old_rows = query(campaign, f"SELECT {metrics} FROM edits WHERE step >= 3 ORDER BY step")
    old_evals = query(campaign, "SELECT * EXCLUDE (attempt, node) FROM evals ORDER BY ALL")
    rebuild_model(campaign, before.stop - 1, tmp_path / "recorded")

    state = rerun_campaign(campaign, shards=[1])

    after = state.shards[1]
    assert after.status == "done" and after.attempt == before.attempt + 1
    rebuild_model(campaign, before.stop - 1, tmp_path / "rerun")
    base = load_file(campaign.parent / "model" / "model.safetensors")
    recorded = load_file(tmp_path / "recorded" / "model.safetensors")
    rerun = load_file(tmp_path / "rerun" / "model.safetensors")
    assert recorded.keys() == rerun.keys()
    for name, weight in recorded.items():
        delta = weight - base[name]
        if float(delta.abs().max()) == 0.0:
            assert torch.equal(rerun[name], weight), name
            continue
        error = float((rerun[name] - weight).abs().max() / delta.abs().max())
        assert error <= REL_TOL, (name, error)
    new_rows = query(campaign, f"SELECT {metrics} FROM edits WHERE step >= 3 ORDER BY step")
    _assert_rows_close(new_rows.to_pylist(), old_rows.to_pylist())
    new_evals = query(campaign, "SELECT * EXCLUDE (attempt, node) FROM evals ORDER BY ALL")
    _assert_rows_close(new_evals.to_pylist(), old_evals.to_pylist())
    modules = query(campaign, "SELECT DISTINCT modules FROM edits WHERE step >= 3")
    assert modules.column("modules").to_pylist() == ["transformer.h.0.mlp.c_proj"]
    _, metadata = read_safetensors(campaign / "editlog" / "shard=1.safetensors")
    assert metadata["editlog_version"] == str(EDIT_LOG_VERSION)  # rewritten in the new format
    assert frozen_spec(campaign).method == "rome"


def _assert_rows_close(new: list[dict], old: list[dict]) -> None:
    """Equal rows, floats to REL_TOL relative."""
    assert len(new) == len(old)
    for new_row, old_row in zip(new, old, strict=True):
        assert new_row.keys() == old_row.keys()
        for key, value in old_row.items():
            if isinstance(value, float):
                assert new_row[key] == pytest.approx(value, rel=REL_TOL, abs=1e-6), key
            else:
                assert new_row[key] == value, key
