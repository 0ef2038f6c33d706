"""Loading edit requests: the dev data, every format, auto-detection and file-level errors."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest

from seqedit.schemas.formats import locate_subject
from seqedit.schemas.loaders import (
    DatasetError,
    LoadResult,
    RequestFormat,
    load_requests,
)
from tests.shared_files import require_dev_file

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "data"

FIXTURE_FORMATS = {
    "counterfact_rome.json": RequestFormat.COUNTERFACT_ROME,
    "counterfact_easyedit.json": RequestFormat.COUNTERFACT_EASYEDIT,
    "zsre_mend.json": RequestFormat.ZSRE_MEND,
    "zsre_knowedit.json": RequestFormat.ZSRE_KNOWEDIT,
    "requests.jsonl": RequestFormat.JSONL,
}

DEV_FILES = {
    "counterfact_dev.json": (RequestFormat.COUNTERFACT_EASYEDIT, 2000),
    "counterfact_rome_format_dev.json": (RequestFormat.COUNTERFACT_ROME, 250),
    "zsre_dev.json": (RequestFormat.ZSRE_KNOWEDIT, 1000),
    "zsre_mend_dev.json": (RequestFormat.ZSRE_MEND, 1000),
}


def records(name: str) -> list[dict[str, Any]]:
    """A fresh copy of a fixture file's records."""
    loaded: list[dict[str, Any]] = json.loads((FIXTURES / name).read_text())
    return loaded


def write(tmp_path: Path, data: Any, name: str = "data.json") -> Path:
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


# --- the shared dev files ------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(DEV_FILES))
def test_dev_file_loads_strictly_with_expected_count(name: str) -> None:
    fmt, count = DEV_FILES[name]
    result = load_requests(require_dev_file(name))
    assert result.format is fmt
    assert len(result.requests) == result.total_records == count
    assert result.rejected == []
    assert len({r.case_id for r in result.requests}) == count
    explicit = load_requests(require_dev_file(name), fmt)
    assert explicit.requests == result.requests
    assert explicit.detected is None


def test_dev_counterfact_easyedit_fields() -> None:
    first = load_requests(require_dev_file("counterfact_dev.json")).requests[0]
    assert first.case_id == 0
    assert first.prompt == "The mother tongue of {} is"
    assert first.subject == "Danielle Darrieux"
    assert (first.target_new, first.target_true) == ("English", "French")
    assert first.filled_prompt == "The mother tongue of Danielle Darrieux is"
    assert first.paraphrase_prompts == [
        "Where Danielle Darrieux is from, people speak the language of"
    ]
    assert first.neighborhood_prompts[0].prompt == "Michel Rocard is a native speaker of"
    assert first.neighborhood_prompts[0].target == "French"


def test_dev_counterfact_rome_fields() -> None:
    result = load_requests(require_dev_file("counterfact_rome_format_dev.json"))
    first = result.requests[0]
    assert (first.case_id, first.prompt, first.subject) == (18, "{}, created by", "Porsche 911")
    assert (first.target_new, first.target_true, first.relation_id) == ("Honda", "Porsche", "P176")
    assert len(first.paraphrase_prompts) == 2
    assert len(first.neighborhood_prompts) == 10
    assert {n.target for n in first.neighborhood_prompts} == {"Porsche"}
    assert len(first.generation_prompts) == 10


def test_dev_zsre_fields() -> None:
    knowedit = load_requests(require_dev_file("zsre_dev.json")).requests[0]
    assert (knowedit.case_id, knowedit.prompt) == (0, "Which family does {} belong to?")
    assert (knowedit.target_new, knowedit.target_true) == ("Noctuidae", "Aspidoceratidae")
    assert [n.target for n in knowedit.neighborhood_prompts] == ["genus", "genus"]
    mend = load_requests(require_dev_file("zsre_mend_dev.json")).requests[0]
    assert (mend.case_id, mend.prompt) == (0, "When was the inception of {}?")
    assert (mend.target_new, mend.target_true) == ("1998", None)  # answers[0], as MEMIT
    assert mend.paraphrase_prompts == ["When was the IAAF Combined Events Challenge launched?"]
    (neighbour,) = mend.neighborhood_prompts
    assert neighbour.prompt.startswith("nq question: ") and neighbour.prompt.endswith("?")
    assert neighbour.target == "The String"


def test_dev_zsre_portability() -> None:
    knowedit = load_requests(require_dev_file("zsre_dev.json")).requests
    assert knowedit[0].portability_prompts[0].target == "Owlet moths"
    raw = json.loads(require_dev_file("zsre_dev.json").read_text())
    groups = [r.get("portability", {}).values() for r in raw]
    assert [len(r.portability_prompts) for r in knowedit] == [sum(map(len, g)) for g in groups]
    mend = load_requests(require_dev_file("zsre_mend_dev.json")).requests[0]
    (question,) = mend.portability_prompts
    assert question.prompt.startswith("What type of sports event is the IAAF")
    assert question.target == "Athletics"


def test_recovered_templates_match_rome_templates() -> None:
    """The 2 dev CounterFact files share case_ids; recovered templates equal ROME's own."""
    easy = {r.case_id: r for r in load_requests(require_dev_file("counterfact_dev.json")).requests}
    rome = load_requests(require_dev_file("counterfact_rome_format_dev.json")).requests
    shared = [r for r in rome if r.case_id in easy]
    assert shared
    for request in shared:
        other = easy[request.case_id]
        assert (other.prompt, other.subject) == (request.prompt, request.subject)
        assert (other.target_new, other.target_true) == (request.target_new, request.target_true)


# --- fixtures, auto-detection ----------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(FIXTURE_FORMATS))
def test_fixture_autodetects_and_logs(name: str, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="seqedit.schemas.loaders"):
        result = load_requests(FIXTURES / name)
    assert result.format is FIXTURE_FORMATS[name]
    assert result.detected
    assert f"detected format {result.format.value}" in caplog.text
    assert len(result.requests) == 3
    assert load_requests(FIXTURES / name, result.format.value).requests == result.requests


def test_jsonl_content_in_json_file_is_detected(tmp_path: Path) -> None:
    path = write(tmp_path, (FIXTURES / "requests.jsonl").read_text(), "requests.json")
    result = load_requests(path)
    assert result.format is RequestFormat.JSONL
    assert result.detected == "one JSON object per line"


def test_result_is_pydantic_and_serialisable() -> None:
    result = load_requests(FIXTURES / "zsre_mend.json")
    again = LoadResult.model_validate_json(result.model_dump_json())
    assert again == result


def test_zsre_case_id_defaults_to_position_but_respects_given(tmp_path: Path) -> None:
    data = records("zsre_mend.json")
    data[1]["case_id"] = 77
    result = load_requests(write(tmp_path, data), "zsre_mend")
    assert [r.case_id for r in result.requests] == [0, 77, 2]


@pytest.mark.parametrize(
    ("prompt", "subject", "template", "written"),
    [
        ("Toko Yasuda, the", "Toko Yasuda", "{}, the", "Toko Yasuda"),
        (
            "The tongue of Danielle Darrieux is",
            "Danielle Darrieux",
            "The tongue of {} is",
            "Danielle Darrieux",
        ),
        ("The capital of france is", "France", "The capital of {} is", "france"),
        ("iPhone maker", "IPHONE", "{} maker", "iPhone"),
        ("Parisian life in Paris", "Paris", "Parisian life in {}", "Paris"),  # whole word first
        ("Paris and Paris", "Paris", "{} and Paris", "Paris"),  # only the first occurrence
        ("Parisian", "Paris", "{}ian", "Paris"),  # substring when no whole word
        ("The A.B. band", "A.B.", "The {} band", "A.B."),
        ("nothing here", "Paris", None, None),
    ],
)
def test_locate_subject(prompt: str, subject: str, template: str | None, written: str | None):
    found = locate_subject(prompt, subject)
    if template is None:
        assert found is None
    else:
        assert found == (template, written)
        assert template.replace("{}", str(written)) == prompt


def test_easyedit_case_insensitive_subject_is_recorded_as_written(tmp_path: Path) -> None:
    data = records("counterfact_easyedit.json")
    data[0]["subject"] = "danielle darrieux"
    request = load_requests(write(tmp_path, data), "counterfact_easyedit").requests[0]
    assert request.subject == "Danielle Darrieux"
    assert request.filled_prompt == data[0]["prompt"]


def test_rome_accepts_memit_style_neighbour_objects(tmp_path: Path) -> None:
    data = records("counterfact_rome.json")
    data[0]["neighborhood_prompts"] = [{"prompt": "Honda Civic is made by", "target": "Honda"}]
    request = load_requests(write(tmp_path, data)).requests[0]
    assert request.neighborhood_prompts[0].target == "Honda"


def test_knowedit_skips_blank_locality_answers(tmp_path: Path) -> None:
    data = records("zsre_knowedit.json")
    data[0]["locality"]["Relation_Specificity"][0]["ground_truth"] = [" "]
    request = load_requests(write(tmp_path, data)).requests[0]
    assert len(request.neighborhood_prompts) == 1


# --- limit -----------------------------------------------------------------------------------


def test_limit_keeps_first_valid_records(tmp_path: Path) -> None:
    data = records("counterfact_easyedit.json")
    data[0]["target_new"] = ""
    path = write(tmp_path, data)
    result = load_requests(path, quarantine=True, limit=1)
    assert [r.case_id for r in result.requests] == [2]
    assert [r.index for r in result.rejected] == [0]
    assert [r.case_id for r in load_requests(FIXTURES / "zsre_mend.json", limit=2).requests] == [
        0,
        1,
    ]
    assert load_requests(FIXTURES / "zsre_mend.json", limit=0).requests == []
    with pytest.raises(ValueError, match="limit must be >= 0"):
        load_requests(path, limit=-1)


# --- file-level errors -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("given", "suggested"),
    [
        ("counterfact", ["counterfact_rome", "counterfact_easyedit"]),
        ("zsre-mend", ["zsre_mend"]),
        ("knowedit", ["zsre_knowedit"]),
        ("json", ["jsonl"]),
    ],
)
def test_unknown_format_suggests(given: str, suggested: list[str]) -> None:
    with pytest.raises(DatasetError, match="unknown request format") as caught:
        load_requests(FIXTURES / "zsre_mend.json", given)
    for name in suggested:
        assert repr(name) in str(caught.value)
    assert "Known formats: auto" in str(caught.value)


def test_missing_file_suggests_sibling() -> None:
    with pytest.raises(DatasetError, match="file not found") as caught:
        load_requests(FIXTURES / "zsre_mnd.json")
    assert "did you mean 'zsre_mend.json'" in str(caught.value)
    with pytest.raises(DatasetError, match="does not exist"):
        load_requests(FIXTURES / "nowhere" / "x.json")
    with pytest.raises(DatasetError, match="is a directory"):
        load_requests(FIXTURES)


def test_broken_json_names_line_and_column(tmp_path: Path) -> None:
    path = write(tmp_path, '[\n  {"case_id": 1,\n   "prompt" "x"}\n]', "broken.json")
    with pytest.raises(DatasetError) as caught:
        load_requests(path, "counterfact_easyedit")
    message = str(caught.value)
    assert str(path) in message
    assert "line 3, column 13" in message and "Expecting ':' delimiter" in message
    assert caught.value.errors == []


def test_json_lines_read_as_list_format_gets_hint(tmp_path: Path) -> None:
    path = write(tmp_path, (FIXTURES / "requests.jsonl").read_text(), "x.json")
    with pytest.raises(DatasetError, match="use format='jsonl'"):
        load_requests(path, "counterfact_rome")


def test_json_list_read_as_jsonl_is_refused(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="looks like a JSON list"):
        load_requests(write(tmp_path, records("zsre_mend.json")), "jsonl")


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        ({"data": []}, "are the records under 'data'?"),
        ("42", "got number 42"),
        ([], "holds no records"),
        ([[1]], "record 0 should be a JSON object"),
        ([{"case_id": 1, "prompt": "x"}], "closest is"),
        ([{"case_id": 1, "prompt": "{}", "subject": "a"}], "save them one per line as .jsonl"),
        ("", "invalid JSON at line 1, column 1"),
    ],
)
def test_file_shape_problems(tmp_path: Path, content: Any, fragment: str) -> None:
    with pytest.raises(DatasetError) as caught:
        load_requests(write(tmp_path, content))
    assert fragment in str(caught.value)


def test_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "latin1.json"
    path.write_bytes(b'[{"subject": "Andr\xe9"}]')
    with pytest.raises(DatasetError, match="not UTF-8"):
        load_requests(path, "zsre_mend")


def test_dataset_error_is_value_error() -> None:
    assert issubclass(DatasetError, ValueError)
