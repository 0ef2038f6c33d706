"""Driver pieces that need no Ray: shard planning, request selection, quarantine next to the run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from seqedit.methods.config import HparamsError
from seqedit.pipeline.run.driver import plan_shards, run_campaign, select_requests
from seqedit.schemas.campaign import CampaignSpec, DatasetSpec
from seqedit.schemas.loaders import DatasetError

GOOD = {
    "prompt": "{} was born in",
    "subject": "Ann Lee",
    "target_new": "Rome",
    "target_true": "Oslo",
}


def _dataset(tmp_path: Path) -> Path:
    records = [
        {"case_id": 0, **GOOD},
        {"case_id": 1, "prompt": "{} works for", "target_new": "Acme"},
        {"case_id": 2, **GOOD, "subject": "Cy Po", "target_new": ""},
        {"case_id": 3, **GOOD, "subject": "Di Ra"},
    ]
    path = tmp_path / "requests.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    return path


def _spec(path: Path, *, quarantine: bool, n_edits: int = 2) -> CampaignSpec:
    return CampaignSpec(
        name="t",
        model="m",
        dataset=DatasetSpec(path=str(path), quarantine=quarantine),
        n_edits=n_edits,
    )


def test_plan_shards_covers_every_step_once() -> None:
    shards = plan_shards(10, 4)
    assert [(s.start, s.stop) for s in shards] == [(0, 4), (4, 8), (8, 10)]
    assert [(s.start, s.stop) for s in plan_shards(3, None)] == [(0, 3)]


def test_quarantine_writes_rejects_next_to_the_run_and_carries_on(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    chosen = select_requests(_spec(_dataset(tmp_path), quarantine=True), run_dir)
    assert [r.case_id for r in chosen] == [0, 3]
    rejects = [json.loads(line) for line in (run_dir / "rejects.jsonl").read_text().splitlines()]
    assert [r["case_id"] for r in rejects] == [1, 2]
    reasons = json.dumps(rejects)
    assert "subject" in reasons and "target_new" in reasons


def test_strict_mode_names_file_record_and_field(tmp_path: Path) -> None:
    path = _dataset(tmp_path)
    with pytest.raises(DatasetError) as info:
        select_requests(_spec(path, quarantine=False), tmp_path)
    message = str(info.value)
    assert "requests.jsonl" in message and "case_id 2" in message and "target_new" in message


def test_too_few_valid_records_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="n_edits is 3 but only 2 valid records"):
        select_requests(_spec(_dataset(tmp_path), quarantine=True, n_edits=3), tmp_path)


def test_misspelled_hparam_fails_before_anything_is_written(tmp_path: Path) -> None:
    spec = _spec(_dataset(tmp_path), quarantine=True).model_copy(
        update={"method": "rome", "hparams": {"layer": 1, "v_num_grad_step": 5}}
    )
    with pytest.raises(HparamsError, match="did you mean 'v_num_grad_steps'"):
        run_campaign(spec, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_shuffled_order_is_a_seeded_permutation_before_the_offset(tmp_path: Path) -> None:
    records = [{"case_id": i, **GOOD, "subject": f"Ann Lee{i}"} for i in range(10)]
    path = tmp_path / "ten.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")

    def chosen(**dataset: object) -> list[int]:
        spec = CampaignSpec(
            name="t", model="m", dataset=DatasetSpec(path=str(path), **dataset), n_edits=4
        )
        return [r.case_id for r in select_requests(spec, tmp_path)]

    assert chosen() == [0, 1, 2, 3]
    first = chosen(order="shuffled", shuffle_seed=1)
    assert first == chosen(order="shuffled", shuffle_seed=1) != [0, 1, 2, 3]
    assert first != chosen(order="shuffled", shuffle_seed=2)
    whole = chosen(order="shuffled", shuffle_seed=1, offset=0) + chosen(
        order="shuffled", shuffle_seed=1, offset=4
    )
    assert whole[:4] == first and len(set(whole)) == 8
