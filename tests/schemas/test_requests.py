"""EditRequest / LocalityPrompt validation itself, independent of any file format."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from seqedit.schemas.requests import EditRequest, LocalityPrompt, spaced

GOOD: dict[str, Any] = {
    "case_id": 7,
    "prompt": "The mother tongue of {} is",
    "subject": "Danielle Darrieux",
    "target_new": "English",
    "target_true": "French",
    "paraphrase_prompts": ["Danielle Darrieux speaks"],
    "neighborhood_prompts": [{"prompt": "Michel Rocard speaks", "target": "French"}],
}


def errors_of(**changes: Any) -> list[tuple[tuple[str | int, ...], str]]:
    with pytest.raises(ValidationError) as caught:
        EditRequest.model_validate(GOOD | changes)
    return [(tuple(e["loc"]), e["msg"]) for e in caught.value.errors()]


def test_valid_request() -> None:
    request = EditRequest.model_validate(GOOD)
    assert request.filled_prompt == "The mother tongue of Danielle Darrieux is"
    assert request.neighborhood_prompts == [
        LocalityPrompt(prompt="Michel Rocard speaks", target="French")
    ]
    assert request.generation_prompts == [] and request.relation_id is None
    assert EditRequest.model_validate_json(request.model_dump_json()) == request


def test_target_true_is_optional() -> None:
    request = EditRequest.model_validate(GOOD | {"target_true": None})
    assert request.target_true is None


@pytest.mark.parametrize(("prompt", "count"), [("no slot", 0), ("{} and {}", 2), ("{}{}{}", 3)])
def test_prompt_needs_exactly_one_placeholder(prompt: str, count: int) -> None:
    ((loc, msg),) = errors_of(prompt=prompt)
    assert loc == ("prompt",)
    assert f"exactly one '{{}}', found {count}" in msg


@pytest.mark.parametrize("field", ["target_new", "target_true"])
@pytest.mark.parametrize("value", ["", "   "])
def test_blank_targets_rejected(field: str, value: str) -> None:
    ((loc, _),) = errors_of(**{field: value})
    assert loc == (field,)


@pytest.mark.parametrize("value", ["", "  "])
def test_blank_subject_rejected(value: str) -> None:
    ((_, msg),) = errors_of(subject=value)
    assert "subject" in msg or "at least 1 character" in msg


def test_case_id_must_be_non_negative_int() -> None:
    assert errors_of(case_id=-1)[0][0] == ("case_id",)
    assert errors_of(case_id="abc")[0][0] == ("case_id",)


def test_unknown_fields_forbidden() -> None:
    ((loc, msg),) = errors_of(attribute_prompts=["x"])
    assert loc == ("attribute_prompts",) and "Extra inputs" in msg


def test_neighbour_needs_prompt_and_target() -> None:
    errors = errors_of(neighborhood_prompts=[{"prompt": "", "target": "x"}, {"prompt": "p"}])
    assert [loc for loc, _ in errors] == [
        ("neighborhood_prompts", 0, "prompt"),
        ("neighborhood_prompts", 1, "target"),
    ]


def test_request_is_frozen() -> None:
    request = EditRequest.model_validate(GOOD)
    with pytest.raises(ValidationError):
        request.target_new = "German"  # type: ignore[misc]


def test_spaced() -> None:
    assert spaced("Paris") == " Paris"
    assert spaced(" Paris") == " Paris"
