"""The synthetic world: deterministic, valid, consistent, and round-trips through CounterFact."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import pytest

from seqedit.schemas.loaders import load_requests
from seqedit.schemas.requests import EditRequest, LocalityPrompt
from seqedit.testbed.world import RELATIONS, fact_statements, synthetic_world, write_counterfact

TEMPLATES = {rel.relation_id: rel.templates for rel in RELATIONS}
OBJECTS = {rel.relation_id: rel.objects for rel in RELATIONS}


def _subject_of(prompt: str, templates: tuple[str, ...]) -> str | None:
    """The subject a filled prompt names under one of `templates`, or None."""
    for template in templates:
        head, tail = template.split("{}")
        if prompt.startswith(head) and prompt.endswith(tail) and len(prompt) > len(head + tail):
            return prompt[len(head) : len(prompt) - len(tail)]
    return None


def test_same_seed_same_world_other_seed_other_world() -> None:
    assert synthetic_world(60, 3) == synthetic_world(60, 3)
    assert synthetic_world(60, 3) != synthetic_world(60, 4)
    # A smaller world is not required to be a prefix, but must be just as deterministic.
    assert synthetic_world(5, 3) == synthetic_world(5, 3)


def test_records_are_valid_counterfact_like_requests() -> None:
    world = synthetic_world(120, 0)
    assert [r.case_id for r in world] == list(range(120))
    assert len({r.subject for r in world}) == 120
    assert len({r.relation_id for r in world}) == len(RELATIONS)
    for req in world:
        assert EditRequest.model_validate_json(req.model_dump_json()) == req
        assert req.relation_id is not None and req.target_true is not None
        assert req.prompt in TEMPLATES[req.relation_id]
        assert req.target_true in OBJECTS[req.relation_id]
        assert req.target_new in OBJECTS[req.relation_id]
        assert req.target_new != req.target_true
        assert len(req.paraphrase_prompts) == 2
        assert len(set(req.paraphrase_prompts) | {req.filled_prompt}) == 3
        assert all(
            _subject_of(p, TEMPLATES[req.relation_id]) == req.subject
            for p in req.paraphrase_prompts
        )
        assert len(req.generation_prompts) == 2
        assert all(req.subject in g for g in req.generation_prompts)


def test_neighbours_share_relation_and_true_object_and_are_never_edited() -> None:
    world = synthetic_world(200, 1, n_neighbors=4)
    edited = {r.subject for r in world}
    for req in world:
        assert len(req.neighborhood_prompts) == 4
        for near in req.neighborhood_prompts:
            assert near.target == req.target_true
            other = _subject_of(near.prompt, TEMPLATES[req.relation_id or ""])
            assert other is not None and other != req.subject
            assert other not in edited


def test_world_is_consistent_every_subject_has_one_answer_per_relation() -> None:
    answers: dict[tuple[str, str], set[str]] = defaultdict(set)
    for req in synthetic_world(300, 2):
        rel = req.relation_id or ""
        answers[(rel, req.subject)].add(req.target_true or "")
        for near in req.neighborhood_prompts:
            other = _subject_of(near.prompt, TEMPLATES[rel])
            assert other is not None
            answers[(rel, other)].add(near.target)
    assert all(len(found) == 1 for found in answers.values())


def test_world_arguments_are_checked() -> None:
    assert synthetic_world(0, 0) == []
    with pytest.raises(ValueError, match="n must be"):
        synthetic_world(-1, 0)
    with pytest.raises(ValueError, match="n_paraphrases"):
        synthetic_world(3, 0, n_paraphrases=9)


def test_fact_statements_hold_every_true_fact_once() -> None:
    world = synthetic_world(30, 0)
    statements = fact_statements(world)
    assert len(statements) == len(set(statements))
    for req in world:
        assert f"{req.filled_prompt} {req.target_true}" in statements
        assert all(f"{p} {req.target_true}" in statements for p in req.paraphrase_prompts)
        assert all(f"{n.prompt} {n.target}" in statements for n in req.neighborhood_prompts)
        assert not any(g in s for g in req.generation_prompts for s in statements)
    with pytest.raises(ValueError, match="case_id 7: target_true is missing"):
        fact_statements([EditRequest(case_id=7, prompt="{} is", subject="A", target_new="B")])


def test_counterfact_round_trip_through_the_rome_loader(tmp_path: Path) -> None:
    world = synthetic_world(40, 5)
    path = write_counterfact(world, tmp_path / "world.json")
    records = json.loads(path.read_text(encoding="utf-8"))
    assert set(records[0]) >= {
        "case_id",
        "requested_rewrite",
        "paraphrase_prompts",
        "neighborhood_prompts",
        "generation_prompts",
    }
    assert set(records[0]["requested_rewrite"]["target_new"]) == {"str"}
    explicit = load_requests(path, "counterfact_rome")
    assert explicit.requests == world
    detected = load_requests(path)
    assert detected.format.value == "counterfact_rome"
    assert detected.requests == world


def test_write_counterfact_refuses_what_the_schema_cannot_hold(tmp_path: Path) -> None:
    odd = EditRequest(
        case_id=3,
        prompt="{} speaks",
        subject="A",
        target_new="Dutch",
        target_true="French",
        neighborhood_prompts=[LocalityPrompt(prompt="B speaks", target="Greek")],
    )
    with pytest.raises(ValueError, match="case_id 3: neighbourhood prompt"):
        write_counterfact([odd], tmp_path / "odd.json")
    no_truth = EditRequest(case_id=4, prompt="{} speaks", subject="A", target_new="Dutch")
    with pytest.raises(ValueError, match="case_id 4"):
        write_counterfact([no_truth], tmp_path / "no_truth.json")
