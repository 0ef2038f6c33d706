"""`seqedit train serac` as a Ray Train job, then `method: serac` in a sequential campaign:
the memory keeps every edit, and the health rows carry its size and scope-hit rate."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from seqedit.pipeline.cli.main import main
from seqedit.pipeline.results.views import query
from seqedit.pipeline.run.driver import run_campaign
from seqedit.pipeline.run.train_job import TrainJob
from seqedit.schemas.campaign import load_spec
from tests.pipeline.specs import write_spec

CONFIG = {"batch_size": 4, "max_steps": 6, "val_every": 3, "cf_lr": 1e-3, "scope": {"dim": 16}}


@pytest.mark.slow
def test_serac_trains_on_ray_and_its_memory_holds_every_edit(
    ray_local: None, tiny_testbed: Path, tmp_path: Path
) -> None:
    lines = (tiny_testbed / "requests.jsonl").read_text().splitlines()
    train, val = tmp_path / "train.jsonl", tmp_path / "val.jsonl"
    train.write_text("\n".join(lines[:24]) + "\n")
    val.write_text("\n".join(lines[24:32]) + "\n")
    config = tmp_path / "serac.yaml"
    config.write_text(json.dumps({**CONFIG, "early_stopping": {"metric": "loss/total"}}))
    out = tmp_path / "out"
    assert main(["train", "serac", "--model", str(tiny_testbed), "--train", str(train),
                 "--val", str(val), "--out", str(out), "--config", str(config)]) == 0  # fmt: skip
    job = TrainJob.model_validate_json((out / "job.json").read_text())
    assert job.method == "serac" and job.config.model_dump()["cf_lr"] == 1e-3
    rows = pq.read_table(out / "train").to_pylist()
    names = {r["name"] for r in rows if r["split"] == "val"}
    assert {"loss/scope", "loss/edit", "loss/total", "scope/rephrase_in",
            "scope/locality_in", "edit/acc"} <= names  # fmt: skip
    assert sorted({r["step"] for r in rows if r["split"] == "val"}) == [3, 6]
    parts = torch.load(out / "best" / "editor.pt", weights_only=True)
    assert {"classifier", "counterfactual", "counterfactual_config", "network"} <= set(parts)

    n = 6
    spec_file = write_spec(tmp_path, tiny_testbed, None, n_edits=n, method="serac",
                           hparams={"checkpoint": str(out)}, health={"every": 3},
                           evaluation={"immediate": True})  # fmt: skip
    state = run_campaign(load_spec(spec_file), tmp_path / "campaign")
    assert state.status == "done"
    edits = query(tmp_path / "campaign", "SELECT memory_size FROM edits ORDER BY step")
    assert edits["memory_size"].to_pylist() == list(range(1, n + 1))
    # the evaluator actors answer with the same trained parts as the editor: each record's
    # immediate P(new) - P(true) is the one the editor verified right after its edit
    pairs = query(
        tmp_path / "campaign",
        "SELECT e.p_new_after - e.p_true_after AS edited, v.em AS evaluated FROM edits e "
        "JOIN evals v USING (case_id) WHERE v.protocol = 'immediate' ORDER BY e.step",
    ).to_pylist()
    assert len(pairs) == n
    for pair in pairs:
        assert pair["evaluated"] == pytest.approx(pair["edited"], abs=1e-5)
    assert any(abs(p["edited"]) > 1e-3 for p in pairs)
    health = query(
        tmp_path / "campaign",
        "SELECT check_name, value FROM health WHERE check_name IN "
        "('memory_size', 'scope_hit_rate') ORDER BY step, check_name",
    ).to_pylist()
    sizes = [h["value"] for h in health if h["check_name"] == "memory_size"]
    assert sizes[-1] == n, "after the last edit the memory holds every edit"
    hits = [h["value"] for h in health if h["check_name"] == "scope_hit_rate"]
    assert hits and all(0.0 <= h <= 1.0 for h in hits)
