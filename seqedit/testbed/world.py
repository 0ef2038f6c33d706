"""A deterministic fictional world of facts, shaped like CounterFact, and its text corpus.

`synthetic_world(n, seed)` invents `n` edit requests: every subject is a novel name built
from syllables (people, companies, products, cities, regions, bands), every relation has
several template phrasings, `target_true` is the world's fact and `target_new` another
object of the same relation. Neighbourhood prompts name *background* subjects (never the
subject of any request) that share the relation and the true object, so their answer is
`target_true` and editing one request can never change another request's neighbours.

`fact_statements(requests)` is the training text of a testbed: every true fact the
requests state (rewrite prompt, paraphrases, neighbourhood prompts, each followed by its
true answer). `write_counterfact` writes requests in the ROME CounterFact JSON schema.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import ClassVar, Final

from pydantic import BaseModel, ConfigDict

from seqedit.errors import SeqeditError
from seqedit.schemas.requests import EditRequest, LocalityPrompt, spaced


class TestbedError(SeqeditError, ValueError):
    """Requests a testbed cannot be built from (or written as CounterFact), naming the record."""

    __test__: ClassVar[bool] = False  # not a pytest test class, despite the name


class Relation(BaseModel):
    """One relation of the world: its phrasings, the kind of subject and its objects."""

    model_config = ConfigDict(frozen=True)

    relation_id: str
    subject_kind: str
    templates: tuple[str, ...]
    generation_templates: tuple[str, ...]
    objects: tuple[str, ...]


# Objects of each kind; a relation's true and new objects are drawn from one list.
_OBJECTS: Final[dict[str, tuple[str, ...]]] = {
    kind: tuple(words.split())
    for kind, words in {
        "city": "Paris London Berlin Madrid Rome Vienna Cairo Tokyo Lisbon Oslo",
        "country": "France Germany Italy Spain Japan Brazil Canada Egypt Norway India",
        "language": "French German Italian Spanish Japanese Russian Dutch Greek Swedish Polish",
        "maker": "Honda Toyota Nokia Sony Fiat Intel Boeing Apple Nissan Philips",
        "occupation": "physicist painter lawyer surgeon poet architect chemist diplomat "
        "journalist banker",
        "instrument": "piano violin guitar cello trumpet flute harp drums saxophone organ",
        "sport": "football tennis cricket baseball hockey golf rugby basketball volleyball boxing",
        "genre": "jazz blues opera rock reggae techno folk punk soul disco",
    }.items()
}

# One block per relation: a line "relation_id subject_kind object_kind", then indented
# lines of "|"-separated phrasings ("{}" is the subject): "fact:" lines hold the fact
# phrasings (rewrite and paraphrase prompts), "gen:" lines the generation prompts.
_RELATION_TABLE: Final = """
P19 person city
    fact: {} was born in | The birthplace of {} is | {} is originally from
    fact: {} came into the world in
    gen:  {} spent an early childhood in | {} grew up near
P27 person country
    fact: {} is a citizen of | The nationality of {} is | {} holds a passport issued by
    fact: {} has citizenship of
    gen:  {} returned home to | {} often speaks about life in
P106 person occupation
    fact: {} works as a | The profession of {} is | By trade, {} is a | {} earns a living as a
    gen:  Every morning, {} goes to work as a | {} is well known as a
P1412 person language
    fact: The mother tongue of {} is | {} is a native speaker of | The first language of {} is
    fact: {} grew up speaking
    gen:  {} writes letters in | At home, {} talks in
P1303 person instrument
    fact: {} plays the | The instrument played by {} is the | {} performs on the
    fact: {} is a virtuoso of the
    gen:  On stage, {} picks up the | {} practises daily on the
P641 person sport
    fact: {} professionally plays | The sport of {} is | {} competes in the sport of
    fact: {} is a professional player of
    gen:  {} trains every day for | The fans of {} love
P159 company city
    fact: The headquarters of {} are in | {} is headquartered in | {} has its head office in
    fact: {} is based in
    gen:  The staff of {} commute to | {} opened a new office in
P176 product maker
    fact: {} is produced by | {}, created by | {} is a product of | {} is manufactured by
    gen:  The warranty for {} is handled by | {} is sold in shops by
P17 city country
    fact: {} is located in | {} is a city in | The country of {} is | {} lies in the country of
    gen:  To visit {}, travellers fly to | The mayor of {} reports to
P37 region language
    fact: The official language of {} is | In {}, the official language is | People in {} speak
    fact: The language of government in {} is
    gen:  Schools in {} teach in | Newspapers in {} are printed in
P740 band city
    fact: {} was formed in | The band {} was founded in | {} started out in
    fact: The home town of {} is
    gen:  {} played their first concert in | {} recorded an album in
P136 band genre
    fact: {} plays the music genre | The musical genre of {} is | {} is a band that plays
    fact: The style of {} is
    gen:  Critics say that {} plays | Fans of {} usually like
"""


def _parse_relations(table: str) -> tuple[Relation, ...]:
    """The relations of `_RELATION_TABLE`, in table order."""
    blocks: list[tuple[str, dict[str, list[str]]]] = []
    for line in table.strip().splitlines():
        if not line.startswith(" "):
            blocks.append((line, {"fact": [], "gen": []}))
            continue
        kind, phrasings = line.strip().split(":", 1)
        blocks[-1][1][kind] += [p.strip() for p in phrasings.split("|")]
    relations = []
    for head, phrasings in blocks:
        relation_id, subject_kind, object_kind = head.split()
        relations.append(
            Relation(
                relation_id=relation_id,
                subject_kind=subject_kind,
                objects=_OBJECTS[object_kind],
                templates=tuple(phrasings["fact"]),
                generation_templates=tuple(phrasings["gen"]),
            )
        )
    return tuple(relations)


RELATIONS: Final[tuple[Relation, ...]] = _parse_relations(_RELATION_TABLE)

_ONSETS: Final = tuple("b br d dr f g gr k kr l m n p pr r s st t tr v z th sh q".split())
_VOWELS: Final = tuple("a e i o u ae ou ei y".split())
_CODAS: Final = ("", "", "", *"n r l s th m x nd rk".split())
_SUFFIXES: Final[dict[str, tuple[str, ...]]] = {
    "company": ("Corp", "Industries", "Systems", "Group", "Labs", "Works"),
    "region": ("ia", "land", "stan", "mark", "ora"),
    "city": ("burg", "ville", "ford", "grad", "polis", "haven"),
}


def _word(rng: random.Random, syllables: int) -> str:
    parts = [
        rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS) for _ in range(syllables)
    ]
    return "".join(parts).capitalize()


def _name(rng: random.Random, kind: str) -> str:
    """A novel name for a subject of `kind` (not guaranteed unique; the caller dedupes)."""
    if kind == "person":
        return f"{_word(rng, 2)} {_word(rng, rng.randint(2, 3))}"
    if kind == "company":
        return f"{_word(rng, rng.randint(2, 3))} {rng.choice(_SUFFIXES['company'])}"
    if kind == "product":
        return f"{_word(rng, 2)} {rng.choice('AXZRTV')}{rng.randint(2, 99)}"
    if kind == "band":
        return f"The {_word(rng, 2)}s"
    return _word(rng, rng.randint(1, 2)) + rng.choice(_SUFFIXES[kind])


def invent_name(rng: random.Random, taken: set[str]) -> str:
    """A novel two-word person-like name whose casefold is not in `taken`."""
    while True:
        name = _name(rng, "person")
        if name.casefold() not in taken:
            return name


class _Names:
    """Draws names that are unique across the whole world."""

    def __init__(self, rng: random.Random) -> None:
        self._rng = rng
        self._used: set[str] = set()

    def draw(self, kind: str) -> str:
        while True:
            name = _name(self._rng, kind)
            if name not in self._used:
                self._used.add(name)
                return name


def synthetic_world(
    n: int,
    seed: int,
    *,
    n_paraphrases: int = 2,
    n_neighbors: int = 3,
    n_generation: int = 2,
) -> list[EditRequest]:
    """`n` fictional CounterFact-like edit requests, identical for identical arguments.

    Relations are spread evenly (shuffled); each request has a distinct subject, a random
    true object, a different new object of the same relation, `n_paraphrases`
    other phrasings, `n_neighbors` neighbourhood prompts about background subjects sharing
    the relation and true object, and `n_generation` generation prompts. case_ids 0..n-1.
    As in CounterFact, the new object is, where the relation allows, the TRUE object of
    another subject of the same relation: the model has learned to produce it, so an edit
    redirects a fact instead of asking for a string the model never emitted.
    """
    if n < 0:
        raise TestbedError(f"n must be >= 0, got {n}")
    max_para = min(len(r.templates) for r in RELATIONS) - 1
    if not 0 <= n_paraphrases <= max_para:
        raise ValueError(f"n_paraphrases must be in 0..{max_para}, got {n_paraphrases}")
    if n_neighbors < 0 or n_generation < 0:
        raise ValueError("n_neighbors and n_generation must be >= 0")
    rng = random.Random(seed)
    names = _Names(rng)
    relations = [RELATIONS[i % len(RELATIONS)] for i in range(n)]
    rng.shuffle(relations)
    # Background subjects per (relation, true object), drawn lazily: n_neighbors + 2 each,
    # so records sharing a fact get overlapping (not identical) neighbourhoods.
    background: dict[tuple[str, str], list[str]] = {}
    requests: list[EditRequest] = []
    trues = [rng.choice(rel.objects) for rel in relations]
    used: dict[str, list[str]] = {}
    for rel, true in zip(relations, trues, strict=True):
        if true not in used.setdefault(rel.relation_id, []):
            used[rel.relation_id].append(true)
    for case_id, (rel, true) in enumerate(zip(relations, trues, strict=True)):
        subject = names.draw(rel.subject_kind)
        known = [o for o in used[rel.relation_id] if o != true]
        new = rng.choice(known or [o for o in rel.objects if o != true])
        order = rng.sample(range(len(rel.templates)), len(rel.templates))
        template, paraphrases = rel.templates[order[0]], order[1 : 1 + n_paraphrases]
        pool = background.get((rel.relation_id, true))
        if pool is None:
            pool = [names.draw(rel.subject_kind) for _ in range(n_neighbors + 2)]
            background[(rel.relation_id, true)] = pool
        neighbours = [
            LocalityPrompt(prompt=rng.choice(rel.templates).format(other), target=true)
            for other in rng.sample(pool, n_neighbors)
        ]
        gen = rng.sample(rel.generation_templates, len(rel.generation_templates))
        generation = [gen[i % len(gen)].format(subject) for i in range(n_generation)]
        requests.append(
            EditRequest(
                case_id=case_id,
                prompt=template,
                subject=subject,
                target_new=new,
                target_true=true,
                relation_id=rel.relation_id,
                paraphrase_prompts=[rel.templates[i].format(subject) for i in paraphrases],
                neighborhood_prompts=neighbours,
                generation_prompts=generation,
            )
        )
    return requests


def fact_statements(requests: Iterable[EditRequest]) -> list[str]:
    """The true facts the requests state, as text, deduplicated in first-seen order.

    Per request: the filled rewrite prompt + " " + target_true, each paraphrase +
    target_true, and each neighbourhood prompt + its own target. Generation prompts are
    not facts and are left out. Raises TestbedError for a request without target_true.
    """
    seen: dict[str, None] = {}
    for req in requests:
        if req.target_true is None:
            raise TestbedError(
                f"case_id {req.case_id}: target_true is missing; a testbed can only learn "
                "facts with a known true object"
            )
        truth = spaced(req.target_true)
        seen.setdefault(req.filled_prompt + truth)
        for para in req.paraphrase_prompts:
            seen.setdefault(para + truth)
        for near in req.neighborhood_prompts:
            seen.setdefault(near.prompt + spaced(near.target))
    return list(seen)


def _counterfact_record(req: EditRequest) -> dict[str, object]:
    if req.target_true is None:
        raise TestbedError(f"case_id {req.case_id}: CounterFact needs target_true, it is None")
    for near in req.neighborhood_prompts:
        if near.target.strip() != req.target_true.strip():
            raise TestbedError(
                f"case_id {req.case_id}: neighbourhood prompt {near.prompt!r} answers "
                f"{near.target!r}, but CounterFact neighbours must answer target_true "
                f"{req.target_true!r}; write these requests as JSONL instead"
            )
    return {
        "case_id": req.case_id,
        "requested_rewrite": {
            "prompt": req.prompt,
            "relation_id": req.relation_id,
            "subject": req.subject,
            "target_new": {"str": req.target_new},
            "target_true": {"str": req.target_true},
        },
        "paraphrase_prompts": list(req.paraphrase_prompts),
        "neighborhood_prompts": [near.prompt for near in req.neighborhood_prompts],
        "attribute_prompts": [],
        "generation_prompts": list(req.generation_prompts),
    }


def write_counterfact(requests: Sequence[EditRequest], path: str | Path) -> Path:
    """Write `requests` as a ROME-format CounterFact JSON list; returns the path.

    Lossless for requests whose neighbourhood prompts all answer target_true (as in
    CounterFact and `synthetic_world`); anything else raises TestbedError naming the record.
    """
    records = [_counterfact_record(req) for req in requests]
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(records, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    return target
