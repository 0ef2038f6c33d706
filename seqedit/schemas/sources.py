"""Reading dataset files: format names, file-level checks, JSON decoding, format detection.

Everything here fails with a `DatasetError` naming the file. Record-level parsing lives in
`seqedit.schemas.formats`; the orchestration in `seqedit.schemas.loaders`.
"""

from __future__ import annotations

import difflib
import json
from enum import StrEnum
from pathlib import Path
from typing import Any, Final, Literal

from pydantic import BaseModel, ConfigDict, Field

from seqedit.errors import SeqeditError
from seqedit.schemas.messages import describe
from seqedit.schemas.requests import EditRequest


class RequestFormat(StrEnum):
    """The dataset layouts `load_requests` understands (see `seqedit.schemas.formats`)."""

    COUNTERFACT_ROME = "counterfact_rome"
    COUNTERFACT_EASYEDIT = "counterfact_easyedit"
    ZSRE_MEND = "zsre_mend"
    ZSRE_KNOWEDIT = "zsre_knowedit"
    JSONL = "jsonl"


FormatName = Literal[
    "auto", "counterfact_rome", "counterfact_easyedit", "zsre_mend", "zsre_knowedit", "jsonl"
]


class RecordError(BaseModel):
    """One problem with one record: where it is, which field, and why."""

    model_config = ConfigDict(frozen=True)

    file: str = Field(description="The dataset file, as given to load_requests.")
    index: int = Field(ge=0, description="0-based position of the record in the file.")
    case_id: int | None = Field(default=None, description="The record's case_id, if readable.")
    field: str = Field(default="", description="Dotted source path; '' for the whole record.")
    reason: str
    line: int | None = Field(default=None, description="1-based line (JSON-lines files).")

    def location(self) -> str:
        """Where the problem is, without the file name."""
        head = f"line {self.line}" if self.line else f"record {self.index}"
        extra = [f"record {self.index}"] if self.line else []
        extra += [] if self.case_id is None else [f"case_id {self.case_id}"]
        at = f"{head} ({', '.join(extra)})" if extra else head
        field = f", field '{self.field}'" if self.field else ""
        return f"{at}{field}: {self.reason}"

    def __str__(self) -> str:
        return f"{self.file}: {self.location()}"


class DatasetError(SeqeditError, ValueError):
    """A dataset that cannot be loaded: a file-level problem, or invalid records (`errors`)."""

    def __init__(self, message: str, errors: list[RecordError] | None = None) -> None:
        super().__init__(message)
        self.errors: list[RecordError] = list(errors or [])


class RawRecord(BaseModel):
    """One record as decoded from the file, before parsing."""

    index: int
    line: int | None = None
    value: Any
    decode_error: str | None = None


def _close_names(name: str, options: list[str]) -> list[str]:
    close = difflib.get_close_matches(name, options, n=3, cutoff=0.5)
    partial = [o for o in options if name and name.lower() in o and o not in close]
    return close + partial


def parse_format(name: str) -> RequestFormat | None:
    """The requested format (None for auto); unknown names raise with suggestions."""
    if isinstance(name, RequestFormat):
        return name
    if name == "auto":
        return None
    try:
        return RequestFormat(name)
    except ValueError:
        known = ["auto", *(f.value for f in RequestFormat)]
        close = _close_names(str(name), known)
        hint = f"; did you mean {' or '.join(map(repr, close))}?" if close else "."
        raise DatasetError(
            f"unknown request format {name!r}{hint} Known formats: {', '.join(known)}"
        ) from None


def read_text(path: Path) -> str:
    """The file's text (UTF-8, BOM tolerated); missing files get did-you-mean siblings."""
    if path.is_dir():
        raise DatasetError(f"{path}: is a directory, expected a dataset file")
    if not path.exists():
        message = f"{path}: file not found"
        if path.parent.is_dir():
            siblings = [p.name for p in path.parent.iterdir()]
            close = difflib.get_close_matches(path.name, siblings, n=3, cutoff=0.6)
            if close:
                message += f" (did you mean {' or '.join(map(repr, close))}?)"
        else:
            message += f" (directory {path.parent} does not exist)"
        raise DatasetError(message)
    try:
        return path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DatasetError(f"{path}: not UTF-8 text (bad byte at offset {exc.start})") from None


def _json_error(path: Path, text: str, exc: json.JSONDecodeError, hint: str = "") -> DatasetError:
    rows = text.splitlines()
    row = rows[exc.lineno - 1] if exc.lineno <= len(rows) else ""
    start = max(0, exc.colno - 40)
    snippet = row[start : start + 80]
    caret = " " * (exc.colno - 1 - start) + "^"
    return DatasetError(
        f"{path}: invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}{hint}\n"
        f"    {snippet}\n    {caret}"
    )


def _looks_like_json_lines(text: str) -> bool:
    first = next((ln for ln in text.splitlines() if ln.strip()), "")
    try:
        return isinstance(json.loads(first), dict)
    except json.JSONDecodeError:
        return False


def decode_list(path: Path, text: str) -> list[RawRecord]:
    """The records of a file holding one JSON list; broken JSON names line and column."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        hint = ""
        if exc.msg == "Extra data" and _looks_like_json_lines(text):
            hint = " (the file looks like JSON lines: one object per line; use format='jsonl')"
        raise _json_error(path, text, exc, hint) from None
    if not isinstance(data, list):
        hint = ""
        if isinstance(data, dict):
            lists = [k for k, v in data.items() if isinstance(v, list)]
            hint = f" (are the records under {lists[0]!r}?)" if len(lists) == 1 else ""
        raise DatasetError(
            f"{path}: expected a JSON list of records at the top level, got {describe(data)}{hint}"
        )
    return [RawRecord(index=i, value=v) for i, v in enumerate(data)]


def decode_lines(path: Path, text: str) -> list[RawRecord]:
    """The records of a JSON-lines file; blank lines are skipped, broken lines become records
    with a `decode_error` (so quarantine can set them aside)."""
    if text.lstrip().startswith("["):
        raise DatasetError(
            f"{path}: looks like a JSON list, not JSON lines; use format='auto' or a list format"
        )
    records: list[RawRecord] = []
    for number, row in enumerate(text.splitlines(), start=1):
        if not row.strip():
            continue
        index = len(records)
        try:
            records.append(RawRecord(index=index, line=number, value=json.loads(row)))
        except json.JSONDecodeError as exc:
            reason = f"invalid JSON at column {exc.colno}: {exc.msg}"
            records.append(RawRecord(index=index, line=number, value=row, decode_error=reason))
    return records


def detect(path: Path, text: str) -> tuple[RequestFormat, str, list[RawRecord]]:
    """Pick the format from the extension, then from the first record's keys."""
    if path.suffix.lower() in (".jsonl", ".ndjson"):
        return RequestFormat.JSONL, f"extension {path.suffix}", decode_lines(path, text)
    stripped = text.lstrip()
    if stripped.startswith("{") and _looks_like_json_lines(text):
        try:
            json.loads(text)
        except json.JSONDecodeError:
            return RequestFormat.JSONL, "one JSON object per line", decode_lines(path, text)
    records = decode_list(path, text)
    if not records:
        raise DatasetError(f"{path}: the file holds no records, so its format cannot be detected")
    first = records[0].value
    if not isinstance(first, dict):
        raise DatasetError(f"{path}: record 0 should be a JSON object, got {describe(first)}")
    found = _detect_from_keys(first)
    if found is None:
        raise DatasetError(_undetected_message(path, first))
    return found[0], found[1], records


_SIGNATURES: Final[dict[RequestFormat, frozenset[str]]] = {
    RequestFormat.COUNTERFACT_ROME: frozenset(
        {"case_id", "requested_rewrite", "paraphrase_prompts", "neighborhood_prompts"}
    ),
    RequestFormat.COUNTERFACT_EASYEDIT: frozenset(
        {
            "case_id",
            "prompt",
            "subject",
            "target_new",
            "ground_truth",
            "rephrase_prompt",
            "locality_prompt",
            "locality_ground_truth",
        }
    ),
    RequestFormat.ZSRE_MEND: frozenset({"subject", "src", "answers", "rephrase", "loc", "loc_ans"}),
    RequestFormat.ZSRE_KNOWEDIT: frozenset(
        {"subject", "prompt", "target_new", "ground_truth", "rephrase_prompt", "locality"}
    ),
}


def _detect_from_keys(first: dict[str, Any]) -> tuple[RequestFormat, str] | None:
    keys = set(first)
    if "requested_rewrite" in keys:
        return RequestFormat.COUNTERFACT_ROME, "first record has 'requested_rewrite'"
    if {"src", "answers"} <= keys:
        return RequestFormat.ZSRE_MEND, "first record has 'src' and 'answers'"
    if {"prompt", "subject", "target_new"} <= keys:
        if "locality_prompt" in keys:
            return RequestFormat.COUNTERFACT_EASYEDIT, "first record has 'locality_prompt'"
        if "locality" in keys or isinstance(first.get("ground_truth"), list):
            return RequestFormat.ZSRE_KNOWEDIT, "first record has 'locality' / list ground_truth"
        if isinstance(first.get("ground_truth"), str):
            return RequestFormat.COUNTERFACT_EASYEDIT, "first record has a string 'ground_truth'"
    return None


def _undetected_message(path: Path, first: dict[str, Any]) -> str:
    keys = set(first)
    best = max(_SIGNATURES, key=lambda f: len(_SIGNATURES[f] & keys))
    lacking = ", ".join(sorted(_SIGNATURES[best] - keys))
    hint = ""
    if keys <= set(EditRequest.model_fields):
        hint = " These look like EditRequest records: save them one per line as .jsonl."
    return (
        f"{path}: cannot detect the format from the first record's keys "
        f"[{', '.join(sorted(keys))}]; closest is {best.value} (lacking {lacking}).{hint} "
        f"Pass format= one of: {', '.join(f.value for f in RequestFormat)}"
    )
