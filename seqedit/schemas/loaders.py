"""Load edit requests from dataset files, with errors that say exactly what to fix.

`load_requests` reads one file in one of the `RequestFormat`s (or detects it), turns every
record into an `EditRequest` and reports each bad record as a `RecordError` naming the file,
the record's position, its case_id and the offending field. In strict mode every error is
collected and raised together as a `DatasetError`; in quarantine mode bad records are set
aside in `LoadResult.rejected` (see `write_quarantine`) and the good ones are returned.
The meaning of each format's fields is documented in `seqedit.schemas.formats`.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Final

from pydantic import BaseModel, ConfigDict, Field

from seqedit.schemas.formats import FieldIssue, parse_record
from seqedit.schemas.requests import EditRequest
from seqedit.schemas.sources import (
    DatasetError,
    FormatName,
    RawRecord,
    RecordError,
    RequestFormat,
    decode_lines,
    decode_list,
    detect,
    parse_format,
    read_text,
)
from seqedit.storage import Location, Where, location

log = logging.getLogger(__name__)

MAX_LISTED_ERRORS: Final = 20


class RejectedRecord(BaseModel):
    """A record set aside in quarantine mode: its errors and the raw record as read."""

    model_config = ConfigDict(frozen=True)

    index: int
    line: int | None = None
    case_id: int | None = None
    errors: list[RecordError]
    record: Any = Field(description="The raw JSON value (the raw text for unparsable lines).")


class LoadResult(BaseModel):
    """What `load_requests` read: the valid requests, the rejects, and how it read them."""

    model_config = ConfigDict(frozen=True)

    path: Path
    format: RequestFormat
    detected: str | None = Field(default=None, description="Why auto-detection chose format.")
    total_records: int = Field(description="Records in the file (before limit).")
    requests: list[EditRequest]
    rejected: list[RejectedRecord] = Field(default_factory=list)


def _strict_error(
    path: Path, fmt: RequestFormat, rejected: list[RejectedRecord], scanned: int
) -> DatasetError:
    """The strict-mode error: every record error, the first MAX_LISTED_ERRORS listed."""
    errors = [e for r in rejected for e in r.errors]
    lines = [
        f"{path}: {len(rejected)} of {scanned} record(s) are invalid "
        f"(format {fmt.value}), {len(errors)} error(s):"
    ]
    lines += [f"  - {e.location()}" for e in errors[:MAX_LISTED_ERRORS]]
    if len(errors) > MAX_LISTED_ERRORS:
        lines.append(f"  ... and {len(errors) - MAX_LISTED_ERRORS} more error(s)")
    lines.append("Fix these records, or load with quarantine=True to set them aside.")
    return DatasetError("\n".join(lines), errors)


def _record_errors(
    path: str, raw: RawRecord, case_id: int | None, issues: list[FieldIssue]
) -> list[RecordError]:
    return [
        RecordError(
            file=path,
            index=raw.index,
            case_id=case_id,
            field=i.field,
            reason=i.reason,
            line=raw.line,
        )
        for i in issues
    ]


def _parse_one(
    fmt: RequestFormat, raw: RawRecord, first_index: dict[int, int]
) -> tuple[int | None, EditRequest | None, list[FieldIssue]]:
    """(case_id, request, issues) of one decoded record; `first_index` (case_id -> record
    index) finds duplicate case ids and learns this record's."""
    if raw.decode_error is not None:
        return None, None, [FieldIssue(field="", reason=raw.decode_error)]
    parsed = parse_record(fmt.value, raw.value, raw.index)
    case_id, issues = parsed.case_id, list(parsed.issues)
    if case_id is not None:
        if case_id in first_index:
            reason = f"duplicate case_id {case_id}: also used by record {first_index[case_id]}"
            issues.append(FieldIssue(field="case_id", reason=reason))
        else:
            first_index[case_id] = raw.index
    return case_id, parsed.request, issues


def load_requests(
    path: str | Path,
    format: FormatName | str = "auto",
    *,
    quarantine: bool = False,
    limit: int | None = None,
) -> LoadResult:
    """Read the edit requests in `path`.

    `format="auto"` picks the format from the extension (.jsonl) or the first record's keys,
    logs what it chose and why, and records it in `LoadResult.format`/`detected`.
    Strict mode (default) raises `DatasetError` listing every invalid record; with
    `quarantine=True` invalid records go to `LoadResult.rejected` and a warning is logged.
    `limit` keeps the first `limit` valid records; records after them are not examined.
    File-level problems (missing file, broken JSON, wrong top-level shape, unknown or
    undetectable format) always raise `DatasetError`.
    """
    if limit is not None and limit < 0:
        raise DatasetError(f"limit must be >= 0, got {limit}")
    source = Path(path)
    fmt = parse_format(format)
    text = read_text(source)
    detected: str | None = None
    if fmt is None:
        fmt, detected, records = detect(source, text)
        log.info("%s: detected format %s (%s)", source, fmt.value, detected)
    elif fmt is RequestFormat.JSONL:
        records = decode_lines(source, text)
    else:
        records = decode_list(source, text)
    if not records:
        raise DatasetError(f"{source}: the file holds no records")

    requests: list[EditRequest] = []
    rejected: list[RejectedRecord] = []
    first_index: dict[int, int] = {}
    scanned = 0
    for raw in records:
        if limit is not None and len(requests) >= limit:
            break
        scanned += 1
        case_id, request, issues = _parse_one(fmt, raw, first_index)
        if issues or request is None:
            errors = _record_errors(str(path), raw, case_id, issues)
            rejected.append(RejectedRecord(index=raw.index, line=raw.line, case_id=case_id,
                                           errors=errors, record=raw.value))  # fmt: skip
        else:
            requests.append(request)

    if rejected and not quarantine:
        raise _strict_error(source, fmt, rejected, scanned)
    if rejected:
        log.warning(
            "%s: %d of %d record(s) rejected and quarantined; first: %s",
            source,
            len(rejected),
            scanned,
            rejected[0].errors[0].location(),
        )
    log.info("%s: loaded %d edit request(s) (format %s)", source, len(requests), fmt.value)
    return LoadResult(
        path=source,
        format=fmt,
        detected=detected,
        total_records=len(records),
        requests=requests,
        rejected=rejected,
    )


def write_quarantine(result: LoadResult, path: Where) -> Location:
    """Write `result.rejected` as JSON lines (errors + raw record), atomically, to a local
    path or a storage URI; returns where. Always written (empty when nothing was rejected),
    so readers never see a partial or stale file."""
    target = location(path)
    target.write_text("".join(reject.model_dump_json() + "\n" for reject in result.rejected))
    log.info("%s: wrote %d rejected record(s)", target, len(result.rejected))
    return target


__all__ = [
    "DatasetError",
    "FormatName",
    "LoadResult",
    "RecordError",
    "RejectedRecord",
    "RequestFormat",
    "load_requests",
    "write_quarantine",
]
