"""Record-level errors of the request loaders: what is reported, quarantine, JSON lines."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest

from seqedit.schemas.loaders import (
    MAX_LISTED_ERRORS,
    DatasetError,
    RecordError,
    RejectedRecord,
    load_requests,
    write_quarantine,
)

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "data"

Records = list[dict[str, Any]]


def records(name: str) -> Records:
    loaded: Records = json.loads((FIXTURES / name).read_text())
    return loaded


def write(tmp_path: Path, data: Any, name: str = "data.json") -> Path:
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


def only_error(path: Path, fmt: str = "auto") -> RecordError:
    with pytest.raises(DatasetError) as caught:
        load_requests(path, fmt)
    assert len(caught.value.errors) == 1, caught.value
    assert str(path) in str(caught.value)
    return caught.value.errors[0]


def _set(rec: dict[str, Any], path: str, value: Any) -> None:
    *parents, last = path.split(".")
    node: Any = rec
    for key in parents:
        node = node[int(key)] if isinstance(node, list) else node[key]
    slot = int(last) if isinstance(node, list) else last
    if value is _DELETE:
        del node[slot]
    else:
        node[slot] = value


_DELETE = object()

ROME, EASY = "counterfact_rome.json", "counterfact_easyedit.json"
MEND, KNOW = "zsre_mend.json", "zsre_knowedit.json"
RW, RS = "requested_rewrite", "locality.Relation_Specificity"

# (fixture, record index, dotted key to change, new value, reported field (None: the key),
#  fragment of the reason)
CASES: list[tuple[str, int, str, Any, str | None, str]] = [
    (EASY, 1, "target_new", _DELETE, None, "required field is missing"),
    (ROME, 2, f"{RW}.subject", _DELETE, None, "required field is missing"),
    (ROME, 1, f"{RW}.target_new.str", "", None, "must not be empty"),
    (ROME, 1, f"{RW}.target_new.str", "  ", None, "whitespace only"),
    (ROME, 0, f"{RW}.prompt", "Made by", None, "exactly one '{}', found 0: 'Made by'"),
    (ROME, 0, f"{RW}.prompt", "{} by {}", None, "exactly one '{}', found 2: '{} by {}'"),
    (ROME, 0, f"{RW}.target_true", "Porsche", None, "expected an object, got string 'Porsche'"),
    (ROME, 0, "neighborhood_prompts.1", 7, None, "expected a string (or {prompt, target})"),
    (ROME, 0, "paraphrase_prompts.1", None, None, "expected a string, got null"),
    (EASY, 2, "subject", "Madrid Univ", None, "subject 'Madrid Univ' does not occur in prompt"),
    (EASY, 1, "target_new", 5, None, "expected a string, got number 5"),
    (EASY, 1, "case_id", -4, None, "must be >= 0, got number -4"),
    (EASY, 1, "locality_ground_truth", "", None, "must not be empty"),
    (EASY, 1, "locality_ground_truth", _DELETE, None, "required when the other"),
    (EASY, 0, "prompt", "A {} B Danielle Darrieux", None, "already contains '{}'"),
    (MEND, 1, "answers", [], None, "at least one answer"),
    (MEND, 1, "answers", "Lecanorales", None, "expected a list, got string"),
    (MEND, 2, "loc", "who sang it", None, "lacks 'nq question: '"),
    (MEND, 2, "rephrase", ["x"], None, "expected a string, got a list of 1"),
    (KNOW, 0, "ground_truth", [], None, "at least one answer"),
    (KNOW, 0, "ground_truth", [[3]], "ground_truth.0.0", "expected a string, got number 3"),
    (KNOW, 1, f"{RS}.0.prompt", _DELETE, None, "required field is missing"),
    (KNOW, 1, RS, {"a": 1}, None, "expected a list, got an object"),
    (KNOW, 0, "portability.Reasoning.0", "x", None, "expected an object {prompt, ground_truth}"),
    (KNOW, 0, "portability.Reasoning.0.ground_truth", "", None, "must not be empty"),
]


@pytest.mark.parametrize(("name", "index", "key", "value", "field", "fragment"), CASES)
def test_bad_record_is_named_precisely(
    tmp_path: Path, name: str, index: int, key: str, value: Any, field: str | None, fragment: str
) -> None:
    field = field or key
    data = records(name)
    _set(data[index], key, value)
    error = only_error(write(tmp_path, data, name))
    assert (error.index, error.field) == (index, field)
    assert fragment in error.reason
    expected_id = data[index].get("case_id", index)
    assert error.case_id == (expected_id if isinstance(expected_id, int) else None)
    text = str(error)
    assert text.startswith(f"{tmp_path / name}: record {index}")
    assert f"field '{field}'" in text


def test_error_string_format() -> None:
    error = RecordError(
        file="counterfact.json",
        index=17,
        case_id=123,
        field="requested_rewrite.subject",
        reason="subject 'X' does not occur in prompt '{} is'",
    )
    assert str(error) == (
        "counterfact.json: record 17 (case_id 123), field 'requested_rewrite.subject': "
        "subject 'X' does not occur in prompt '{} is'"
    )
    bare = RecordError(file="a.json", index=3, reason="expected a JSON object, got number 1")
    assert str(bare) == "a.json: record 3: expected a JSON object, got number 1"
    lined = RecordError(file="a.jsonl", index=3, line=5, case_id=9, field="x", reason="bad")
    assert str(lined) == "a.jsonl: line 5 (record 3, case_id 9), field 'x': bad"


def test_wrong_type_case_id_has_no_case_id(tmp_path: Path) -> None:
    data = records("counterfact_easyedit.json")
    data[1]["case_id"] = "abc"
    error = only_error(write(tmp_path, data))
    assert (error.case_id, error.field) == (None, "case_id")
    assert error.reason == "expected an integer, got string 'abc'"
    assert str(error).endswith("record 1, field 'case_id': expected an integer, got string 'abc'")


def test_misspelt_key_gets_suggestion(tmp_path: Path) -> None:
    data = records("counterfact_easyedit.json")
    data[1]["target_nwe"] = data[1].pop("target_new")
    error = only_error(write(tmp_path, data))
    assert error.field == "target_new"
    assert error.reason == "required field is missing (the record has 'target_nwe': a misspelling?)"


def test_non_object_record(tmp_path: Path) -> None:
    data: list[Any] = [*records("zsre_mend.json"), "oops"]
    error = only_error(write(tmp_path, data), "zsre_mend")
    assert (error.index, error.field, error.case_id) == (3, "", None)
    assert error.reason == "expected a JSON object, got string 'oops'"


def test_duplicate_case_id_names_both_records(tmp_path: Path) -> None:
    data = records("counterfact_easyedit.json")
    data[2]["case_id"] = data[0]["case_id"]
    error = only_error(write(tmp_path, data))
    assert (error.index, error.case_id, error.field) == (2, 0, "case_id")
    assert error.reason == "duplicate case_id 0: also used by record 0"


def test_all_problems_of_one_record_are_reported(tmp_path: Path) -> None:
    data = records("counterfact_rome.json")
    data[0]["requested_rewrite"]["prompt"] = "no placeholder"
    del data[0]["requested_rewrite"]["target_true"]
    data[0]["paraphrase_prompts"] = "one"
    with pytest.raises(DatasetError) as caught:
        load_requests(write(tmp_path, data))
    fields = {e.field for e in caught.value.errors}
    assert fields == {
        "requested_rewrite.prompt",
        "requested_rewrite.target_true",
        "paraphrase_prompts",
    }
    assert "1 of 3 record(s) are invalid (format counterfact_rome), 3 error(s)" in str(caught.value)


def test_strict_mode_lists_first_errors_and_count(tmp_path: Path) -> None:
    base = records("counterfact_easyedit.json")[0]
    data = [dict(base, case_id=i, target_new="") for i in range(MAX_LISTED_ERRORS + 5)]
    path = write(tmp_path, data)
    with pytest.raises(DatasetError) as caught:
        load_requests(path)
    message = str(caught.value)
    assert len(caught.value.errors) == MAX_LISTED_ERRORS + 5
    assert message.count("field 'target_new': must not be empty") == MAX_LISTED_ERRORS
    assert "... and 5 more error(s)" in message
    assert "quarantine=True" in message
    assert message.startswith(f"{path}: 25 of 25 record(s) are invalid")


# --- quarantine ------------------------------------------------------------------------------


def bad_easyedit(tmp_path: Path) -> Path:
    data = records("counterfact_easyedit.json")
    data[1]["subject"] = "Nobody"
    data.append({"case_id": 9})
    return write(tmp_path, data, "cf.json")


def test_quarantine_keeps_good_and_rejects_bad(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="seqedit.schemas.loaders"):
        result = load_requests(bad_easyedit(tmp_path), quarantine=True)
    assert [r.case_id for r in result.requests] == [0, 3]
    assert [(r.index, r.case_id) for r in result.rejected] == [(1, 2), (3, 9)]
    assert result.rejected[0].record["subject"] == "Nobody"
    assert {e.field for e in result.rejected[1].errors} >= {"prompt", "subject", "target_new"}
    assert "2 of 4 record(s) rejected" in caplog.text


def test_write_quarantine_jsonl_atomic(tmp_path: Path) -> None:
    result = load_requests(bad_easyedit(tmp_path), quarantine=True)
    target = tmp_path / "run" / "rejected.jsonl"
    assert write_quarantine(result, target).local_path == target
    lines = target.read_text().splitlines()
    assert len(lines) == 2
    first = RejectedRecord.model_validate_json(lines[0])
    assert first == result.rejected[0]
    assert "does not occur in prompt" in json.loads(lines[0])["errors"][0]["reason"]
    assert sorted(p.name for p in target.parent.iterdir()) == ["rejected.jsonl"]  # no tmp left
    clean = load_requests(FIXTURES / "zsre_mend.json", quarantine=True)
    assert write_quarantine(clean, target).read_text() == ""


# --- JSON lines ------------------------------------------------------------------------------


def test_jsonl_errors_give_line_numbers(tmp_path: Path) -> None:
    good = (FIXTURES / "requests.jsonl").read_text().splitlines()
    bad_type = json.loads(good[1]) | {"target_new": 5}
    unknown = json.loads(good[2]) | {"case_id": 99, "subjct": "x"}
    lines = [good[0], "", bad_type, '{"case_id": 4, "prompt": "{} x",', "", unknown]
    text = "\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n"
    path = write(tmp_path, text, "reqs.jsonl")
    with pytest.raises(DatasetError) as caught:
        load_requests(path)
    errors = caught.value.errors
    assert [(e.line, e.index, e.case_id, e.field) for e in errors] == [
        (3, 1, 55, "target_new"),
        (4, 2, None, ""),
        (6, 3, 99, "subjct"),
    ]
    assert errors[0].reason == "expected a string, got number 5"
    assert errors[1].reason.startswith("invalid JSON at column 33:")
    assert errors[2].reason == "unknown field (did you mean 'subject'?)"
    assert "line 4 (record 2): invalid JSON at column 33" in str(caught.value)
    result = load_requests(path, quarantine=True)
    assert [r.case_id for r in result.requests] == [18]
    assert result.rejected[1].record == '{"case_id": 4, "prompt": "{} x",'


def test_jsonl_nested_error_path(tmp_path: Path) -> None:
    row = json.loads((FIXTURES / "requests.jsonl").read_text().splitlines()[0])
    row["neighborhood_prompts"][2]["target"] = ""
    row["subject"] = " "
    error = only_error(write(tmp_path, json.dumps(row), "one.jsonl"))
    assert (error.line, error.field) == (1, "neighborhood_prompts.2.target")
    row["neighborhood_prompts"][2]["target"] = "Porsche"
    error = only_error(write(tmp_path, json.dumps(row), "one.jsonl"))
    assert (error.field, error.reason) == ("subject", "subject is empty or whitespace only")
