"""Reading a text corpus: local files or pyarrow filesystem URIs, in four kinds.

A *source* is a local path (``Path``, or a ``str`` without a ``scheme://``) or a URI that
``pyarrow.fs.FileSystem.from_uri`` accepts (``file:///abs/corpus.parquet``, ``s3://...``).
Kinds, chosen by suffix (case-insensitive) or directory layout:

``.txt``
    one document per line; whitespace-only lines are skipped (``\\r``/``\\n`` stripped).
``.jsonl``
    one ``{text_column: "..."}`` object per non-empty line; empty texts are skipped.
``.parquet``
    the string column ``text_column``, streamed in record batches of ``_BATCH_ROWS`` rows.
Hugging Face ``Dataset.save_to_disk`` directory
    ``state.json`` lists ``_data_files`` (``[{"filename": "data-00000-of-00002.arrow"}, ...]``)
    in row order; each is an Arrow IPC *stream* (``datasets.ArrowWriter`` uses
    ``pa.RecordBatchStreamWriter``), read batch by batch. A ``DatasetDict`` directory
    (``dataset_dict.json`` with ``"splits"``) is refused: pass ``DIR/<split>``.

In the Arrow kinds null and whitespace-only texts are skipped, like blank lines. A
document's *index* is its position in :func:`iter_documents` order over all sources.
"""

from __future__ import annotations

import difflib
import hashlib
import io
import json
import posixpath
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from seqedit.errors import SeqeditError
from seqedit.storage import StorageError, is_uri, location

Kind = Literal["txt", "jsonl", "parquet", "hf_dataset"]
Source = str | Path

SUPPORTED_KINDS = (
    ".txt (one document per line)",
    ".jsonl (one object per line, text in field text_column)",
    ".parquet (string column text_column)",
    "a Hugging Face Dataset.save_to_disk directory (state.json + .arrow files)",
)
_SUFFIX_KINDS: dict[str, Kind] = {".txt": "txt", ".jsonl": "jsonl", ".parquet": "parquet"}
_BATCH_ROWS = 1024  # parquet rows per record batch (bounds memory)
_CHUNK = 1 << 20  # bytes per read when hashing


class CorpusError(SeqeditError, ValueError):
    """A corpus source that cannot be read; the message names the file (and line/row/field)."""


@dataclass(frozen=True)
class _Source:
    """One resolved source: how to name it in messages, where its bytes are, its kind."""

    name: str  # the source as the caller gave it
    fs: pafs.FileSystem
    path: str  # path inside ``fs``: the file, or the dataset directory
    kind: Kind
    data_files: tuple[str, ...] = ()  # hf_dataset: data file names, in row order

    def files(self) -> list[tuple[str, str, str]]:
        """(base name, fs path, label for messages) of every file holding corpus bytes."""
        if self.kind != "hf_dataset":
            return [(posixpath.basename(self.path), self.path, self.name)]
        return [
            (f, posixpath.join(self.path, f), f"{self.name.rstrip('/')}/{f}")
            for f in self.data_files
        ]


# ----------------------------------------------------------------------------- public API


def iter_documents(sources: Sequence[Source], *, text_column: str = "text") -> Iterator[str]:
    """Yield every document of ``sources`` in order (see the module docstring for kinds).

    Sources are resolved now (a missing file, an unknown suffix or a DatasetDict raises
    :class:`CorpusError` at once); file contents are read lazily, one batch at a time.
    """
    return _iter_resolved(_resolve_all(sources), text_column)


def count_documents(sources: Sequence[Source], *, text_column: str = "text") -> int:
    """The number of documents :func:`iter_documents` yields (reads the whole corpus)."""
    return sum(1 for _ in iter_documents(sources, text_column=text_column))


def read_documents(
    sources: Sequence[Source], indices: Sequence[int], *, text_column: str = "text"
) -> Iterator[tuple[int, str]]:
    """Yield ``(index, document)`` for the strictly increasing document ``indices``.

    Streams the corpus and stops as soon as the last index is read, so a shard reads only
    up to its last document. An index past the end raises :class:`CorpusError`.
    """
    # a range (a shard of every document) stays a range: memory does not follow the shard
    wanted = indices if isinstance(indices, range) else [int(i) for i in indices]
    if not (isinstance(wanted, range) and wanted.step > 0):
        for k, (a, b) in enumerate(pairwise(wanted)):
            if b <= a:
                raise ValueError(
                    f"indices must be strictly increasing: indices[{k + 1}]={b} <= {a}"
                )
    if wanted and wanted[0] < 0:
        raise ValueError(f"indices must be >= 0, got indices[0]={wanted[0]}")
    return _select(_resolve_all(sources), wanted, text_column)


def corpus_fingerprint(sources: Sequence[Source], *, text_column: str = "text") -> str:
    """sha256 over each source's base name and bytes, in order, plus a non-default column.

    A Hugging Face dataset directory contributes each listed data file (name and bytes) in
    ``state.json`` order. For ``.txt``/``.jsonl`` with ``text_column="text"`` this equals
    the fingerprint earlier versions stored (``name\\0`` + hex sha256 of the bytes, per file).
    """
    digest = hashlib.sha256()
    for src in _resolve_all(sources):
        for base, path, label in src.files():
            digest.update(base.encode() + b"\0")
            digest.update(_file_sha256(src.fs, path, label).encode())
    if text_column != "text":
        digest.update(b"text_column\0" + text_column.encode())
    return digest.hexdigest()


def source_name(source: Source) -> str:
    """The base name of a source, without touching it: ``corpus.txt`` for ``data/corpus.txt``
    or ``s3://bucket/data/corpus.txt``, ``train`` for a dataset directory ``dd/train/``."""
    text = str(source)
    if isinstance(source, str) and is_uri(source):
        return posixpath.basename(urlsplit(text).path.rstrip("/"))
    return Path(text).name


# ----------------------------------------------------------------------------- resolving


def _resolve_all(sources: Sequence[Source]) -> list[_Source]:
    """Resolve every source up front, so a bad one fails before any document is read."""
    if isinstance(sources, str | Path):
        raise TypeError(f"sources must be a sequence of paths/URIs, got one: {sources!r}")
    return [_resolve(source) for source in sources]


def _resolve(source: Source) -> _Source:
    """Find the filesystem, check the source exists and decide its kind."""
    name = str(source)
    try:
        where = location(source)
    except StorageError as exc:
        raise CorpusError(f"{name}: not a URI pyarrow.fs can open ({exc})") from exc
    fs, path = where.fs, where.fs_path
    info = _file_info(fs, path, name)
    if info.type == pafs.FileType.NotFound:
        raise CorpusError(f"{name}: no such corpus file or directory")
    if info.type == pafs.FileType.Directory:
        return _resolve_directory(name, fs, path)
    suffix = posixpath.splitext(path)[1].lower()
    kind = _SUFFIX_KINDS.get(suffix)
    if kind is None:
        raise CorpusError(
            f"{name}: unsupported corpus suffix {suffix or '(none)'!r}; "
            f"supported: {'; '.join(SUPPORTED_KINDS)}"
        )
    return _Source(name, fs, path, kind)


def _resolve_directory(name: str, fs: pafs.FileSystem, path: str) -> _Source:
    """A ``save_to_disk`` dataset directory, with its data files listed and checked."""
    dict_json = posixpath.join(path, "dataset_dict.json")
    if _file_info(fs, dict_json, name).type == pafs.FileType.File:
        splits = _read_json(fs, dict_json, f"{name}/dataset_dict.json")
        found = splits.get("splits") if isinstance(splits, dict) else None
        listed = ", ".join(map(str, found)) if isinstance(found, list) and found else "unknown"
        example = f"{name}/{found[0]}" if isinstance(found, list) and found else f"{name}/<split>"
        raise CorpusError(
            f"{name}: a Hugging Face DatasetDict directory (splits: {listed}); pass one "
            f"split's directory DIR/<split>, e.g. {example}"
        )
    state_path = posixpath.join(path, "state.json")
    if _file_info(fs, state_path, name).type != pafs.FileType.File:
        raise CorpusError(
            f"{name}: a directory without state.json (not a Hugging Face save_to_disk "
            f"dataset); supported: {'; '.join(SUPPORTED_KINDS)}"
        )
    label = f"{name}/state.json"
    state = _read_json(fs, state_path, label)
    entries = state.get("_data_files") if isinstance(state, dict) else None
    if not isinstance(entries, list):
        raise CorpusError(f"{label}: field '_data_files' must be a list of {{'filename': ...}}")
    names: list[str] = []
    for i, entry in enumerate(entries):
        fname = entry.get("filename") if isinstance(entry, dict) else None
        if not isinstance(fname, str) or fname in ("", ".", "..") or "/" in fname or "\\" in fname:
            raise CorpusError(
                f"{label}: field '_data_files[{i}].filename' must be a file name in the "
                f"dataset directory, got {fname!r}"
            )
        names.append(fname)
    infos = fs.get_file_info([posixpath.join(path, f) for f in names]) if names else []
    for i, (fname, info) in enumerate(zip(names, infos, strict=True)):
        if info.type != pafs.FileType.File:
            raise CorpusError(
                f"{label}: field '_data_files[{i}].filename' names a missing file: {name}/{fname}"
            )
    return _Source(name, fs, path, "hf_dataset", tuple(names))


def _file_info(fs: pafs.FileSystem, path: str, name: str) -> pafs.FileInfo:
    """``fs.get_file_info`` with errors (permissions, network) naming the source."""
    try:
        return fs.get_file_info(path)
    except (pa.ArrowException, OSError) as exc:
        raise CorpusError(f"{name}: cannot inspect {path}: {exc}") from exc


def _read_json(fs: pafs.FileSystem, path: str, label: str) -> Any:
    """Parse a small JSON file (``state.json``, ``dataset_dict.json``)."""
    try:
        with fs.open_input_stream(path) as handle:
            return json.loads(handle.read().decode("utf-8"))
    except (OSError, pa.ArrowException, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CorpusError(f"{label}: cannot read JSON: {exc}") from exc


def _file_sha256(fs: pafs.FileSystem, path: str, label: str) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    try:
        with fs.open_input_stream(path) as handle:
            for chunk in iter(lambda: handle.read(_CHUNK), b""):
                digest.update(chunk)
    except (OSError, pa.ArrowException) as exc:
        raise CorpusError(f"{label}: cannot read corpus file: {exc}") from exc
    return digest.hexdigest()


# ----------------------------------------------------------------------------- reading


def _iter_resolved(resolved: list[_Source], column: str) -> Iterator[str]:
    """Documents of resolved sources, in order."""
    for src in resolved:
        if src.kind in ("txt", "jsonl"):
            yield from _line_documents(src, column)
        elif src.kind == "parquet":
            yield from _parquet_documents(src, column)
        else:
            for _, path, label in src.files():
                yield from _arrow_stream_documents(src.fs, path, label, column)


def _select(
    resolved: list[_Source], wanted: Sequence[int], column: str
) -> Iterator[tuple[int, str]]:
    """The documents at ``wanted`` (sorted), closing the reader after the last one."""
    if not wanted:
        return
    documents = _iter_resolved(resolved, column)
    pending = iter(wanted)
    target = next(pending)
    seen = 0
    try:
        for index, text in enumerate(documents):
            seen = index + 1
            if index == target:
                yield index, text
                nxt = next(pending, None)
                if nxt is None:
                    return
                target = nxt
    finally:
        documents.close()
    names = ", ".join(src.name for src in resolved)
    raise CorpusError(
        f"document index {target} is past the end of the corpus ({seen} documents in {names})"
    )


def _line_documents(src: _Source, column: str) -> Iterator[str]:
    """A .txt line or the ``column`` field of a .jsonl line; blank ones skipped."""
    jsonl = src.kind == "jsonl"
    try:
        raw = src.fs.open_input_stream(src.path)
    except (OSError, pa.ArrowException) as exc:
        raise CorpusError(f"{src.name}: cannot open corpus file: {exc}") from exc
    with io.TextIOWrapper(raw, encoding="utf-8") as handle:  # universal newlines, as open()
        try:
            for lineno, line_raw in enumerate(handle, start=1):
                line = line_raw.rstrip("\r\n")
                if not line.strip():
                    continue
                if not jsonl:
                    yield line
                    continue
                text = _jsonl_text(line, column, f"{src.name}:{lineno}")
                if text.strip():
                    yield text
        except UnicodeDecodeError as exc:
            raise CorpusError(f"{src.name}: not UTF-8 text: {exc}") from exc


def _jsonl_text(line: str, column: str, where: str) -> str:
    """The string field ``column`` of one JSONL line; ``where`` is ``file:line``."""
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as exc:
        raise CorpusError(f"{where}: invalid JSON: {exc}") from exc
    if isinstance(obj, dict) and isinstance(obj.get(column), str):
        return str(obj[column])
    detail = ""
    if isinstance(obj, dict) and column in obj:
        detail = f" (it is {type(obj[column]).__name__})"
    elif isinstance(obj, dict):
        detail = f" (keys: {sorted(obj)}{_did_you_mean(column, list(obj))})"
    raise CorpusError(f"{where}: expected an object with a string {column!r} field{detail}")


def _parquet_documents(src: _Source, column: str) -> Iterator[str]:
    """The string column ``column`` of a Parquet file, one record batch at a time."""
    try:
        handle = src.fs.open_input_file(src.path)
    except (OSError, pa.ArrowException) as exc:
        raise CorpusError(f"{src.name}: cannot open corpus file: {exc}") from exc
    with handle:
        try:
            parquet = pq.ParquetFile(handle)
        except (OSError, pa.ArrowException) as exc:
            raise CorpusError(f"{src.name}: not a readable Parquet file: {exc}") from exc
        _check_column(src.name, parquet.schema_arrow, column)
        row = 0
        batches = parquet.iter_batches(batch_size=_BATCH_ROWS, columns=[column])
        while True:
            try:
                batch = next(batches, None)
            except (OSError, pa.ArrowException) as exc:
                raise CorpusError(f"{src.name}: unreadable data at row {row}: {exc}") from exc
            if batch is None:
                return
            yield from _texts(batch.column(0))
            row += batch.num_rows


def _arrow_stream_documents(
    fs: pafs.FileSystem, path: str, label: str, column: str
) -> Iterator[str]:
    """The string column ``column`` of one Arrow IPC stream file, batch by batch."""
    try:
        handle = fs.open_input_stream(path)
    except (OSError, pa.ArrowException) as exc:
        raise CorpusError(f"{label}: cannot open data file: {exc}") from exc
    with handle:
        try:
            reader = pa.ipc.open_stream(handle)
        except (OSError, pa.ArrowException) as exc:
            raise CorpusError(
                f"{label}: not an Arrow IPC stream (what datasets' save_to_disk writes): {exc}"
            ) from exc
        _check_column(label, reader.schema, column)
        index = reader.schema.get_field_index(column)
        row = 0
        while True:
            try:
                batch = reader.read_next_batch()
            except StopIteration:
                return
            except (OSError, pa.ArrowException) as exc:
                raise CorpusError(f"{label}: unreadable record batch at row {row}: {exc}") from exc
            yield from _texts(batch.column(index))
            row += batch.num_rows


def _texts(array: pa.Array) -> Iterator[str]:
    """Non-null, non-blank strings of one column chunk."""
    for text in array.to_pylist():
        if text is not None and text.strip():
            yield text


def _check_column(label: str, schema: pa.Schema, column: str) -> None:
    """``column`` must exist once in ``schema`` and hold strings."""
    names = list(schema.names)
    if column not in names:
        raise CorpusError(
            f"{label}: no column {column!r} (columns: {names}"
            f"{_did_you_mean(column, names)}); set text_column to the text column"
        )
    if names.count(column) > 1:
        raise CorpusError(f"{label}: column {column!r} appears {names.count(column)} times")
    kind = schema.field(column).type
    value_kind = kind.value_type if pa.types.is_dictionary(kind) else kind
    if str(value_kind) not in ("string", "large_string", "string_view"):
        raise CorpusError(f"{label}: column {column!r} has type {kind}, expected strings")


def _did_you_mean(name: str, candidates: list[str]) -> str:
    """``"; did you mean 'x'?"`` for the closest candidate, or ``""``."""
    close = difflib.get_close_matches(name, candidates, n=1)
    return f"; did you mean {close[0]!r}?" if close else ""
