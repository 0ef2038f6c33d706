"""Request splits: no subject in two splits, sizes near the fractions, seeded, loadable."""

from __future__ import annotations

import json
import random
import re
from collections import Counter
from pathlib import Path

import pytest
from pydantic import ValidationError

import seqedit.testbed.build as build_module
from seqedit.pipeline.cli.main import main
from seqedit.schemas.loaders import load_requests
from seqedit.schemas.requests import EditRequest
from seqedit.testbed.build import REQUESTS_FILE, TestbedConfig, TestbedReport
from seqedit.testbed.splits import (
    SPLIT_NAMES,
    SPLITS_FILE,
    RequestSplits,
    SplitSpec,
    load_split,
    load_splits,
    split_requests,
    split_requests_file,
    write_splits,
)
from seqedit.testbed.world import TestbedError

OLD_REPORT = Path(__file__).parents[1] / "fixtures" / "campaign_v1" / "model" / "testbed.json"
SHORT = TestbedConfig.tiny().model_copy(update={"steps": 12, "target_recall": None})


def make_requests(group_sizes: list[int]) -> list[EditRequest]:
    """Requests about len(group_sizes) subjects, group i with group_sizes[i] requests, the
    subjects interleaved (so a split's case_ids are not one contiguous range)."""
    slots = [s for s, size in enumerate(group_sizes) for _ in range(size)]
    random.Random(123).shuffle(slots)
    return [
        EditRequest(
            case_id=1000 + i,
            prompt="{} lives in",
            subject=f"Subject {s}",
            target_new="Rome",
            target_true="Paris",
        )
        for i, s in enumerate(slots)
    ]


def varied_requests(n_subjects: int = 120, seed: int = 7) -> list[EditRequest]:
    rng = random.Random(seed)
    return make_requests([rng.randint(1, 4) for _ in range(n_subjects)])


def subjects_of(requests: list[EditRequest], case_ids: list[int]) -> set[str]:
    by_id = {r.case_id: r.subject for r in requests}
    return {by_id[c] for c in case_ids}


def test_no_subject_shared_and_every_case_id_once_in_request_order() -> None:
    requests = varied_requests()
    splits = split_requests(requests, SplitSpec())
    subjects = [subjects_of(requests, splits.case_ids(name)) for name in SPLIT_NAMES]
    assert all(subjects), "every split gets subjects"
    assert not subjects[0] & subjects[1] and not subjects[0] & subjects[2]
    assert not subjects[1] & subjects[2]
    listed = [c for name in SPLIT_NAMES for c in splits.case_ids(name)]
    assert Counter(listed) == Counter(r.case_id for r in requests)
    order = {r.case_id: i for i, r in enumerate(requests)}
    for name in SPLIT_NAMES:
        positions = [order[c] for c in splits.case_ids(name)]
        assert positions == sorted(positions), f"{name} keeps the requests' order"
    assert splits.n_subjects == {
        name: len(s) for name, s in zip(SPLIT_NAMES, subjects, strict=True)
    }
    assert sum(splits.n_subjects.values()) == 120


@pytest.mark.parametrize(
    "fractions",
    [(0.8, 0.1, 0.1), (0.5, 0.25, 0.25), (0.7, 0.3, 0.0), (1.0, 0.0, 0.0), (0.2, 0.3, 0.5)],
)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sizes_within_one_group_of_the_fractions(
    fractions: tuple[float, float, float], seed: int
) -> None:
    requests = varied_requests(seed=seed + 10)
    biggest = max(Counter(r.subject for r in requests).values())
    spec = SplitSpec(**dict(zip(SPLIT_NAMES, fractions, strict=True)), seed=seed)
    splits = split_requests(requests, spec)
    sizes = splits.sizes()
    assert sum(sizes.values()) == len(requests)
    for name, fraction in zip(SPLIT_NAMES, fractions, strict=True):
        assert abs(sizes[name] - fraction * len(requests)) <= biggest, (name, sizes)
        if fraction == 0:
            assert sizes[name] == 0


def test_the_documented_rule_on_single_fact_subjects() -> None:
    """Ten subjects of one request each at 0.8/0.1/0.1: the first eight of the seeded
    shuffle go to train (train wins the tie at one record short), then validation, test."""
    requests = make_requests([1] * 10)
    for seed in (0, 5):
        order = sorted(r.subject for r in requests)
        random.Random(seed).shuffle(order)
        splits = split_requests(requests, SplitSpec(seed=seed))
        assert splits.sizes() == {"train": 8, "validation": 1, "test": 1}
        assert subjects_of(requests, splits.train) == set(order[:8])
        assert subjects_of(requests, splits.validation) == {order[8]}
        assert subjects_of(requests, splits.test) == {order[9]}


def test_deterministic_for_a_seed_and_different_for_another() -> None:
    requests = varied_requests()
    first = split_requests(requests, SplitSpec(seed=3))
    assert split_requests(requests, SplitSpec(seed=3)) == first
    other = split_requests(requests, SplitSpec(seed=4))
    assert other.test != first.test
    assert first.spec.seed == 3 and other.spec.seed == 4


def test_subjects_are_exact_strings() -> None:
    requests = make_requests([2, 2])
    renamed = [
        r.model_copy(update={"subject": r.subject.upper()}) if i % 2 else r
        for i, r in enumerate(requests)
    ]
    splits = split_requests(renamed, SplitSpec(train=0.5, validation=0.25, test=0.25))
    assert sum(splits.n_subjects.values()) == 4  # "Subject 0" and "SUBJECT 0" differ


def test_too_few_subjects_is_an_error_naming_how_many() -> None:
    many_facts_three_subjects = make_requests([10, 10, 10])
    with pytest.raises(TestbedError, match="3 distinct subjects in 30 requests") as info:
        split_requests(many_facts_three_subjects, SplitSpec())
    assert "validation and test" in str(info.value)
    # the same subjects make two splits when only two are asked for
    splits = split_requests(many_facts_three_subjects, SplitSpec(train=0.7, validation=0.3, test=0))
    assert splits.sizes() == {"train": 20, "validation": 10, "test": 0}


def test_duplicate_case_ids_are_refused() -> None:
    requests = make_requests([1, 1, 1])
    requests[2] = requests[2].model_copy(update={"case_id": requests[0].case_id})
    with pytest.raises(TestbedError, match=f"case_id {requests[0].case_id} appears twice"):
        split_requests(requests, SplitSpec(train=1, validation=0, test=0))


def test_split_spec_checks_its_fractions() -> None:
    assert SplitSpec(train=0.7, validation=0.2, test=0.1).test == 0.1  # sums to 0.9999…
    with pytest.raises(ValidationError, match=r"sum to 0\.9, not 1"):
        SplitSpec(train=0.7, validation=0.1, test=0.1)
    with pytest.raises(ValidationError, match="greater than or equal to 0"):
        SplitSpec(train=1.2, validation=-0.1, test=-0.1)
    assert SplitSpec.parse(" 0.6, 0.2 ,0.2", seed=9) == SplitSpec(
        train=0.6, validation=0.2, test=0.2, seed=9
    )


def write_testbed_inputs(out: Path, requests: list[EditRequest], spec: SplitSpec) -> None:
    out.mkdir(parents=True, exist_ok=True)
    lines = "".join(r.model_dump_json() + "\n" for r in requests)
    (out / REQUESTS_FILE).write_text(lines, encoding="utf-8")
    write_splits(out, split_requests(requests, spec))


def test_load_split_round_trip(tmp_path: Path) -> None:
    requests = varied_requests(40)
    write_testbed_inputs(tmp_path, requests, SplitSpec(seed=1))
    splits = load_splits(tmp_path)
    assert splits == split_requests(requests, SplitSpec(seed=1))
    assert json.loads((tmp_path / SPLITS_FILE).read_text())["version"] == 1
    loaded = {name: load_split(tmp_path, name) for name in SPLIT_NAMES}
    for name in SPLIT_NAMES:
        assert [r.case_id for r in loaded[name]] == splits.case_ids(name)
    by_id = {r.case_id: r for r in requests}
    assert all(by_id[r.case_id] == r for rs in loaded.values() for r in rs)


def test_load_split_errors_name_the_file(tmp_path: Path) -> None:
    requests = varied_requests(40)
    with pytest.raises(
        FileNotFoundError, match=re.escape(f"{tmp_path / SPLITS_FILE}: no splits.json")
    ):
        load_split(tmp_path, "test")
    write_testbed_inputs(tmp_path, requests, SplitSpec())
    with pytest.raises(TestbedError, match=r"splits\.json: no split 'dev'; the splits are train"):
        load_split(tmp_path, "dev")
    lines = "".join(r.model_dump_json() + "\n" for r in requests[:-1])
    (tmp_path / REQUESTS_FILE).write_text(lines, encoding="utf-8")
    with pytest.raises(TestbedError, match="written for other requests"):
        load_split(tmp_path, "train")


def test_old_report_without_split_sizes_loads() -> None:
    raw = json.loads(OLD_REPORT.read_text(encoding="utf-8"))
    assert "split_sizes" not in raw
    assert TestbedReport.model_validate(raw).split_sizes is None


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--split", "0.8,0.1"], "three numbers"),
        (["--split", "0.8,0.1,x"], "three numbers"),
        (["--split", "0.5,0.1,0.1"], "sum to 0.7, not 1"),
        (["--split", "1.2,-0.1,-0.1"], "greater than or equal to 0"),
        (["--split-seed", "3"], "--split-seed goes with --split"),
    ],
)
def test_cli_split_errors_are_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], flags: list[str], message: str
) -> None:
    out = tmp_path / "testbed"
    args = ["testbed", "build", "--out", str(out), "--synthetic", "20", "--quiet", *flags]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("seqedit: error: ") and message in err
    assert not out.exists(), "refused before anything is built"


def test_cli_build_with_split_writes_splits_json(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The one real build (12 steps): CLI -> command -> build -> splits.json and report."""
    real = build_module.build_synthetic_testbed

    def short(out_dir, n, seed, config=None, **kwargs):  # type: ignore[no-untyped-def]
        return real(out_dir, n, seed, SHORT, **kwargs)

    monkeypatch.setattr(build_module, "build_synthetic_testbed", short)
    out = tmp_path / "testbed"
    args = ["testbed", "build", "--out", str(out), "--synthetic", "20", "--quiet"]
    assert main([*args, "--split", "0.6,0.2,0.2", "--split-seed", "4"]) == 0
    printed = capsys.readouterr().out
    assert "split train 12 / validation 4 / test 4" in printed
    splits = RequestSplits.model_validate_json((out / SPLITS_FILE).read_text(encoding="utf-8"))
    assert splits.spec == SplitSpec(train=0.6, validation=0.2, test=0.2, seed=4)
    report = TestbedReport.model_validate_json((out / "testbed.json").read_text())
    assert report.split_sizes == {"train": 12, "validation": 4, "test": 4}
    assert report.n_facts == 20, "the model is trained on every fact"
    test_requests = load_split(out, "test")
    assert [r.case_id for r in test_requests] == splits.test
    for name in SPLIT_NAMES:  # the files `seqedit train` and campaigns take
        loaded = load_requests(out / split_requests_file(name)).requests
        assert loaded == load_split(out, name)
