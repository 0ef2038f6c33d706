"""Per-format record parsers: one raw dataset record in, one `EditRequest` (or its problems) out.

Every parser reads the record through a `_Builder`, which remembers where each `EditRequest`
field came from (a dotted path in the *source* record, e.g. `requested_rewrite.target_new.str`).
Pydantic validation errors are translated back to those source paths with a plain-English
reason, so a user is told which key of which record to fix.

Format semantics (what each source field becomes):

* `counterfact_rome` — the original ROME/MEMIT CounterFact schema. `requested_rewrite.prompt`
  is already a `{}` template. `neighborhood_prompts` are plain strings whose true answer is
  `requested_rewrite.target_true.str` (ROME's neighbourhood score, and EasyEdit's
  `run_AlphaEdit_editing.py`, pair each with target_true); MEMIT-style `{prompt, target}`
  objects are accepted too. `attribute_prompts` have no `EditRequest` field and are ignored.
* `counterfact_easyedit` — EasyEdit's CounterFact: the prompt is *filled*, so the template is
  recovered by locating the subject (see `locate_subject`). `ground_truth` -> target_true,
  `rephrase_prompt` -> the one paraphrase, `locality_prompt`/`locality_ground_truth` -> the
  one neighbourhood prompt; an optional `target_neg` (EasyEdit's DPO data) is kept.
* `zsre_mend` — MEND's zsRE (`zsre_mend_eval.json`). We follow MEMIT's `MENDQADataset`:
  target_new = `answers[0]` and target_true = None (zsRE has no counterfactual "old" answer;
  MEMIT scores token accuracy on `answers[0]`). EasyEdit's `ZsreDataset` instead edits towards
  `alt` with `answers[0]` as ground truth; `alt` and `pred` are not used here. The template is
  recovered from `src` by locating `subject`; `rephrase` -> paraphrase; `loc` must contain
  `nq question: ` (MEMIT asserts it) and becomes the neighbourhood prompt `loc + "?"` with
  target `loc_ans` (MEMIT splits the answer into one prompt per token at scoring time; that
  split needs a tokenizer and belongs to the evaluator). `portability.New Question` /
  `New Answer` (EasyEdit's portability file) -> one portability prompt. case_id = position
  when absent.
* `zsre_knowedit` — KnowEdit's ZsRE (`ZsRE-test-all.json`): `target_new` is the new answer and
  `ground_truth[0]` the old one (as EasyEdit's `KnowEditDataset` does). `rephrase_prompt` ->
  paraphrase; each `locality.Relation_Specificity` item -> a neighbourhood prompt with its
  first answer (nested lists unwrapped, blank answers skipped, as in EasyEdit).
  `portability.{Reasoning,Subject_Aliasing,Logical_Generalization}` items -> portability
  prompts with their first answer; an optional `target_neg` is kept. case_id = position
  when absent.
* `jsonl` — our own: each line is an `EditRequest` as JSON; unknown keys are errors.
"""

from __future__ import annotations

import difflib
import logging
import re
from collections.abc import Callable
from typing import Any, Final

from pydantic import BaseModel, ConfigDict, ValidationError

from seqedit.schemas.messages import Loc, describe, pydantic_reason, shorten, source_path
from seqedit.schemas.requests import EditRequest

log = logging.getLogger(__name__)


class _Missing:
    """Sentinel type for 'no usable value' (absent, or already reported as bad)."""

    def __repr__(self) -> str:
        return "MISSING"


MISSING: Final = _Missing()


class FieldIssue(BaseModel):
    """One problem with one field of a raw record, `field` being a dotted source path."""

    model_config = ConfigDict(frozen=True)

    field: str
    reason: str


class ParsedRecord(BaseModel):
    """The outcome of parsing one record: a request, or the issues that prevented it."""

    model_config = ConfigDict(frozen=True)

    case_id: int | None
    request: EditRequest | None
    issues: list[FieldIssue]


def locate_subject(filled: str, subject: str) -> tuple[str, str] | None:
    """Recover a `{}` template from a filled prompt; returns (template, subject as written).

    Search order, first hit wins: exact match as a whole word, exact match anywhere, then the
    same two case-insensitively. Only the first occurrence becomes `{}` (ROME's lookup uses the
    first `{}` too); the filled prompt is reproduced exactly. A case-insensitive hit returns
    the subject as it is spelled in the prompt.
    """
    escaped = re.escape(subject)
    for flags in (0, re.IGNORECASE):
        for pattern in (rf"(?<!\w){escaped}(?!\w)", escaped):
            match = re.search(pattern, filled, flags)
            if match:
                return filled[: match.start()] + "{}" + filled[match.end() :], match.group(0)
    return None


class _Builder:
    """Reads dotted paths from a raw record, collecting issues instead of raising."""

    def __init__(self, raw: dict[str, Any]) -> None:
        self.raw = raw
        self.kwargs: dict[str, Any] = {}
        self.paths: dict[Loc, str] = {}
        self.issues: list[FieldIssue] = []

    def issue(self, field: str, reason: str) -> None:
        found = FieldIssue(field=field, reason=reason)
        if found not in self.issues:
            self.issues.append(found)

    def get(self, path: str, *, required: bool = True) -> Any:
        """The value at dotted `path` (digit parts index lists), or MISSING.

        MISSING is reported as an issue when the field is required or a container is malformed.
        """
        node: Any = self.raw
        walked: list[str] = []
        for key in path.split("."):
            if isinstance(node, list) and key.isdigit():
                if int(key) >= len(node):
                    self.issue(".".join([*walked, key]), f"no item {key} in {describe(node)}")
                    return MISSING
                node = node[int(key)]
                walked.append(key)
                continue
            if not isinstance(node, dict):
                self.issue(".".join(walked), f"expected an object, got {describe(node)}")
                return MISSING
            if key not in node or (node[key] is None and not required):
                if required:
                    close = difflib.get_close_matches(key, [str(k) for k in node], n=1)
                    hint = f" (the record has {close[0]!r}: a misspelling?)" if close else ""
                    self.issue(".".join([*walked, key]), f"required field is missing{hint}")
                return MISSING
            node = node[key]
            walked.append(key)
        return node

    def text(self, path: str, *, required: bool = True) -> Any:
        """A non-blank string at `path`, or MISSING (with an issue when it is not one)."""
        value = self.get(path, required=required)
        if value is MISSING:
            return MISSING
        if not isinstance(value, str):
            self.issue(path, f"expected a string, got {describe(value)}")
            return MISSING
        if not value.strip():
            self.issue(path, "must not be empty or whitespace only")
            return MISSING
        return value

    def items(self, path: str, *, required: bool = True) -> Any:
        """A list at `path`, or MISSING (with an issue when it is not a list)."""
        value = self.get(path, required=required)
        if value is not MISSING and not isinstance(value, list):
            self.issue(path, f"expected a list, got {describe(value)}")
            return MISSING
        return value

    def put(self, name: str, value: Any, source: str) -> None:
        """Set EditRequest field `name` from `source` unless the value is MISSING."""
        if value is not MISSING:
            self.kwargs[name] = value
            self.paths[(name,)] = source

    def put_list(self, name: str, path: str, *, required: bool) -> None:
        """Copy a list of strings at `path` to EditRequest field `name`."""
        value = self.items(path, required=required)
        if value is not MISSING:
            self.put(name, value, path)

    def put_one(self, name: str, path: str) -> None:
        """Make EditRequest list field `name` hold the single optional string at `path`."""
        value = self.get(path, required=False)
        if value is not MISSING:
            self.kwargs[name] = [value]
            self.paths[(name,)] = self.paths[(name, 0)] = path

    def put_pairs(self, name: str, pairs: list[tuple[Any, str, Any, str]]) -> None:
        """Prompts with answers (field `name`: neighbourhood or portability prompts) from
        (prompt, prompt path, target, target path) tuples."""
        self.kwargs[name] = [{"prompt": p, "target": t} for p, _, t, _ in pairs]
        for i, (_, prompt_path, _, target_path) in enumerate(pairs):
            self.paths[(name, i)] = prompt_path
            self.paths[(name, i, "prompt")] = prompt_path
            self.paths[(name, i, "target")] = target_path

    def put_neighbours(self, pairs: list[tuple[Any, str, Any, str]]) -> None:
        """Neighbourhood prompts from (prompt, prompt path, target, target path) tuples."""
        self.put_pairs("neighborhood_prompts", pairs)

    def put_template(self, prompt_path: str, subject_path: str) -> None:
        """Set prompt and subject from a filled prompt by locating the subject in it."""
        filled, subject = self.text(prompt_path), self.text(subject_path)
        if filled is MISSING or subject is MISSING:
            return
        if "{}" in filled:
            self.issue(prompt_path, f"filled prompt already contains '{{}}': {shorten(filled)}")
            return
        found = locate_subject(filled, subject)
        if found is None:
            reason = f"subject {shorten(subject)} does not occur in prompt {shorten(filled)}"
            self.issue(subject_path, reason)
            return
        template, written = found
        if written != subject:
            log.debug("subject %r matched as %r in %r", subject, written, filled)
        self.put("prompt", template, prompt_path)
        self.put("subject", written, subject_path)


def _counterfact_rome(b: _Builder) -> None:
    rw = "requested_rewrite"
    b.put("case_id", b.get("case_id"), "case_id")
    b.put("prompt", b.get(f"{rw}.prompt"), f"{rw}.prompt")
    b.put("subject", b.text(f"{rw}.subject"), f"{rw}.subject")
    b.put("target_new", b.get(f"{rw}.target_new.str"), f"{rw}.target_new.str")
    true_path = f"{rw}.target_true.str"
    target_true = b.text(true_path)
    b.put("target_true", target_true, true_path)
    b.put("relation_id", b.get(f"{rw}.relation_id", required=False), f"{rw}.relation_id")
    b.put_list("paraphrase_prompts", "paraphrase_prompts", required=True)
    b.put_list("generation_prompts", "generation_prompts", required=False)
    neighbours = b.items("neighborhood_prompts")
    if neighbours is MISSING or target_true is MISSING:
        return
    pairs: list[tuple[Any, str, Any, str]] = []
    for i, item in enumerate(neighbours):
        path = f"neighborhood_prompts.{i}"
        if isinstance(item, str):
            pairs.append((item, path, target_true, true_path))
        elif isinstance(item, dict):  # MEMIT-style {prompt, target}
            prompt, target = item.get("prompt", MISSING), item.get("target", MISSING)
            if prompt is MISSING or target is MISSING:
                b.issue(path, f"expected keys 'prompt' and 'target', got {describe(item)}")
                continue
            pairs.append((prompt, f"{path}.prompt", target, f"{path}.target"))
        else:
            b.issue(path, f"expected a string (or {{prompt, target}}), got {describe(item)}")
    b.put_neighbours(pairs)


def _counterfact_easyedit(b: _Builder) -> None:
    b.put("case_id", b.get("case_id"), "case_id")
    b.put_template("prompt", "subject")
    b.put("target_new", b.get("target_new"), "target_new")
    b.put("target_true", b.get("ground_truth"), "ground_truth")
    b.put("target_neg", b.get("target_neg", required=False), "target_neg")
    b.put_one("paraphrase_prompts", "rephrase_prompt")
    prompt = b.get("locality_prompt", required=False)
    answer = b.get("locality_ground_truth", required=False)
    if prompt is not MISSING and answer is not MISSING:
        b.put_neighbours([(prompt, "locality_prompt", answer, "locality_ground_truth")])
    elif prompt is not MISSING or answer is not MISSING:
        lacking = "locality_ground_truth" if answer is MISSING else "locality_prompt"
        b.issue(lacking, "required when the other locality field is present")


def _case_id_or_index(b: _Builder, index: int) -> None:
    value = b.get("case_id", required=False)
    b.put("case_id", index if value is MISSING else value, "case_id")


def _first_answer(b: _Builder, path: str) -> tuple[Any, str]:
    """The first answer of a list-or-string field, unwrapping nested lists (EasyEdit style)."""
    value = b.get(path)
    while isinstance(value, list):
        if not value:
            b.issue(path, "expected at least one answer, got an empty list")
            return MISSING, path
        value = value[0]
        path = f"{path}.0"
    return value, path


def _zsre_mend(b: _Builder, index: int) -> None:
    _case_id_or_index(b, index)
    b.put_template("src", "subject")
    answers = b.items("answers")
    if answers is not MISSING:
        if answers:
            b.put("target_new", answers[0], "answers.0")
        else:
            b.issue("answers", "expected at least one answer, got an empty list")
    b.put_one("paraphrase_prompts", "rephrase")
    loc, loc_ans = b.text("loc"), b.get("loc_ans")
    if loc is not MISSING and "nq question: " not in loc:
        b.issue("loc", f"neighbourhood prompt lacks 'nq question: ': {shorten(loc)}")
    elif loc is not MISSING and loc_ans is not MISSING:
        prompt = loc if loc.rstrip().endswith("?") else loc + "?"
        b.put_neighbours([(prompt, "loc", loc_ans, "loc_ans")])
    question = b.get("portability.New Question", required=False)
    answer = b.get("portability.New Answer", required=False)
    if question is not MISSING and answer is not MISSING:
        pair = (question, "portability.New Question", answer, "portability.New Answer")
        b.put_pairs("portability_prompts", [pair])


def _zsre_knowedit(b: _Builder, index: int) -> None:
    _case_id_or_index(b, index)
    b.put_template("prompt", "subject")
    b.put("target_new", b.get("target_new"), "target_new")
    target_true, true_path = _first_answer(b, "ground_truth")
    b.put("target_true", target_true, true_path)
    b.put("target_neg", b.get("target_neg", required=False), "target_neg")
    b.put_one("paraphrase_prompts", "rephrase_prompt")
    _knowedit_portability(b)
    items = b.items("locality.Relation_Specificity", required=False)
    if items is MISSING:
        return
    pairs: list[tuple[Any, str, Any, str]] = []
    for i, item in enumerate(items):
        path = f"locality.Relation_Specificity.{i}"
        if not isinstance(item, dict):
            b.issue(path, f"expected an object {{prompt, ground_truth}}, got {describe(item)}")
            continue
        answer, answer_path = _first_answer(b, f"{path}.ground_truth")
        if isinstance(answer, str) and not answer.strip():
            log.debug("%s: blank locality answer skipped", path)
            continue
        if answer is not MISSING:
            pairs.append((b.get(f"{path}.prompt"), f"{path}.prompt", answer, answer_path))
    b.put_neighbours([p for p in pairs if p[0] is not MISSING])


PORTABILITY_KINDS = ("Reasoning", "Subject_Aliasing", "Logical_Generalization")
"""KnowEdit's portability groups, read in this order into `portability_prompts`."""


def _knowedit_portability(b: _Builder) -> None:
    pairs: list[tuple[Any, str, Any, str]] = []
    for kind in PORTABILITY_KINDS:
        items = b.items(f"portability.{kind}", required=False)
        for i, item in enumerate([] if items is MISSING else items):
            path = f"portability.{kind}.{i}"
            if not isinstance(item, dict):
                b.issue(path, f"expected an object {{prompt, ground_truth}}, got {describe(item)}")
                continue
            answer, answer_path = _first_answer(b, f"{path}.ground_truth")
            prompt = b.get(f"{path}.prompt")
            if answer is not MISSING and prompt is not MISSING:
                pairs.append((prompt, f"{path}.prompt", answer, answer_path))
    if pairs:
        b.put_pairs("portability_prompts", pairs)


def _jsonl(b: _Builder) -> None:
    b.kwargs = dict(b.raw)


_PARSERS: Final[dict[str, Callable[[_Builder, int], None]]] = {
    "counterfact_rome": lambda b, _: _counterfact_rome(b),
    "counterfact_easyedit": lambda b, _: _counterfact_easyedit(b),
    "zsre_mend": _zsre_mend,
    "zsre_knowedit": _zsre_knowedit,
    "jsonl": lambda b, _: _jsonl(b),
}


def _plain_case_id(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _field_named_in(message: str) -> str:
    """For a record-level error, the EditRequest field its message names ('' if none)."""
    return next((name for name in EditRequest.model_fields if name in message), "")


def parse_record(fmt: str, raw: Any, index: int) -> ParsedRecord:
    """Parse one raw record of format `fmt` (a `RequestFormat` value) found at `index`."""
    if not isinstance(raw, dict):
        issue = FieldIssue(field="", reason=f"expected a JSON object, got {describe(raw)}")
        return ParsedRecord(case_id=None, request=None, issues=[issue])
    builder = _Builder(raw)
    _PARSERS[fmt](builder, index)
    case_id = _plain_case_id(builder.kwargs.get("case_id"))
    issues = list(builder.issues)
    try:
        request = EditRequest.model_validate(builder.kwargs, strict=True)
    except ValidationError as exc:
        for error in exc.errors(include_url=False):
            loc: Loc = tuple(error["loc"])
            if error["type"] == "missing" and len(loc) == 1 and builder.issues:
                continue  # the builder already said why this field has no value
            field = source_path(loc, builder.paths) or _field_named_in(str(error["msg"]))
            found = FieldIssue(field=field, reason=pydantic_reason(dict(error)))
            if found not in issues:
                issues.append(found)
        request = None
    if issues:
        return ParsedRecord(case_id=case_id, request=None, issues=issues)
    return ParsedRecord(case_id=case_id, request=request, issues=[])
