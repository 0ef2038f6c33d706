"""Every phrasing of a relation that a dataset uses, found from the dataset itself.

A large LM knows a fact however it is asked ("The mother tongue of X is", "X is a native
speaker of"), and stores it with the subject, where locate-then-edit methods look for it.
A tiny model that sees each fact in one phrasing memorises "this prompt -> this answer" at
the prompt's last token instead. Knowledge-storage studies on small transformers find the
cure is multiplicity: each subject in several phrasings, so that keeping the attribute with
the subject is the cheaper solution. CounterFact has no relation ids in EasyEdit's format,
but its records still tie phrasings of one relation together:

a record's neighbourhood prompts ask its relation of other subjects, in phrasings that
are some record's prompt template. `relation_phrasings(records)` joins these links into
relations (union-find over template strings) and maps every template to all of its
relation's templates, most used first. Rephrase prompts do not link relations: in
CounterFact many are loose generation prompts ("Where X is from, people speak the language
of" for a birthplace) and would merge unrelated relations.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence

from seqedit.schemas.requests import EditRequest


class _Union:
    def __init__(self) -> None:
        self.parent: dict[str, str] = {}

    def find(self, item: str) -> str:
        self.parent.setdefault(item, item)
        while self.parent[item] != item:
            self.parent[item] = self.parent[self.parent[item]]
            item = self.parent[item]
        return item

    def join(self, a: str, b: str) -> None:
        self.parent[self.find(a)] = self.find(b)


def _matching_template(prompt: str, templates: Sequence[tuple[str, str, str]]) -> str | None:
    """The known template (longest fixed text first) that `prompt` fills, if any."""
    for template, head, tail in templates:
        if (
            len(prompt) > len(head) + len(tail)
            and prompt.startswith(head)
            and prompt.endswith(tail)
        ):
            return template
    return None


def relation_phrasings(records: Iterable[EditRequest]) -> dict[str, tuple[str, ...]]:
    """Template -> every template of its relation (itself included), most used first.

    Templates are the records' prompts; a neighbourhood prompt links its record's template
    to the known template it fills. Deterministic: ties in use break by the template text.
    """
    records = list(records)
    union = _Union()
    used: Counter[str] = Counter()
    for record in records:
        used[record.prompt] += 1
        union.find(record.prompt)
    known = sorted(
        ((t, *t.split("{}", 1)) for t in union.parent),
        key=lambda entry: (-(len(entry[1]) + len(entry[2])), entry[0]),
    )
    for record in records:
        for near in record.neighborhood_prompts:
            template = _matching_template(near.prompt, known)
            if template is not None:
                union.join(template, record.prompt)
    members: dict[str, list[str]] = {}
    for template in union.parent:
        members.setdefault(union.find(template), []).append(template)
    ordered = {
        root: tuple(sorted(group, key=lambda t: (-used[t], t))) for root, group in members.items()
    }
    return {template: ordered[union.find(template)] for template in union.parent}


def subject_phrasings(
    request: EditRequest, phrasings: dict[str, tuple[str, ...]], limit: int
) -> list[str]:
    """Up to `limit` filled phrasings of `request`'s relation about its subject, its own
    prompt template left out, most used first."""
    others = [t for t in phrasings.get(request.prompt, ()) if t != request.prompt]
    return [t.replace("{}", request.subject, 1) for t in others[:limit]]
