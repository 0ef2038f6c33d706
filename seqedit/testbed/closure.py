"""Close a record set under its targets: every `target_new` becomes something the model
says for another subject.

In CounterFact the new object of an edit is a word a large LM already produces for other
subjects ("English" is some subject's mother tongue). A testbed trained on the edited
facts alone has never produced most new targets, so an edit would ask it for a string it
cannot say. `close_under_targets` adds support facts, which the testbed learns but which
are never edited: for each missing target, the first record of `pool` (the rest of the
dataset) whose true answer it is, else a record with the same phrasing about an invented
subject ("The mother tongue of Brelos Tandmark is English").
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence
from typing import Final

from seqedit.schemas.requests import EditRequest
from seqedit.testbed.world import invent_name

SYNTHETIC_CASE_BASE: Final = 10_000_000
"""case_ids of invented support records start here (far above CounterFact's 21,919)."""


def _key(text: str | None) -> str:
    return (text or "").strip().casefold()


def close_under_targets(
    requests: Sequence[EditRequest],
    pool: Iterable[EditRequest] = (),
    *,
    seed: int = 0,
) -> list[EditRequest]:
    """Support records whose true answers are the `target_new`s no request answers.

    Takes, per missing target in first-seen order, the first `pool` record (not in
    `requests`, subject not edited) that answers it, else invents one from the first request
    wanting it: its prompt, a new subject, target_true = that target, target_new = its
    target_true. Deterministic for a seed. Returns only the added records.
    """
    known = {_key(r.target_true) for r in requests}
    subjects = {_key(r.subject) for r in requests}
    ids = {r.case_id for r in requests}
    by_answer: dict[str, EditRequest] = {}
    for record in pool:
        if record.case_id in ids or _key(record.subject) in subjects:
            continue
        by_answer.setdefault(_key(record.target_true), record)
    rng = random.Random(seed)
    added: list[EditRequest] = []
    invented = 0
    for request in requests:
        target = _key(request.target_new)
        if target in known:
            continue
        known.add(target)
        found = by_answer.get(target)
        if found is not None:
            subjects.add(_key(found.subject))
            added.append(found)
            continue
        subject = invent_name(rng, subjects)
        subjects.add(_key(subject))
        added.append(
            EditRequest(
                case_id=SYNTHETIC_CASE_BASE + invented,
                prompt=request.prompt,
                subject=subject,
                target_new=request.target_true or request.target_new,
                target_true=request.target_new,
                relation_id=request.relation_id,
            )
        )
        invented += 1
    return added
