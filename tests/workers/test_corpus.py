"""Corpus reading: every kind yields the same documents, fingerprints, selection, errors."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from seqedit.workers import corpus as corpus_mod
from seqedit.workers.corpus import (
    CorpusError,
    corpus_fingerprint,
    count_documents,
    iter_documents,
    read_documents,
    source_name,
)

TEXTS = [
    "the cat sat on the mat",
    "",
    "  a red dog runs  ",
    "   ",
    "café ☕ au lait",
    "the blue cat",
    "dog",
    "a mat",
]
DOCS = [t for t in TEXTS if t.strip()]
KINDS = ["txt", "jsonl", "parquet", "parquet_uri", "txt_uri", "hf"]


def write_txt(path: Path, texts: list[str]) -> Path:
    path.write_text("\n".join(texts) + "\n", encoding="utf-8")
    return path


def write_jsonl(path: Path, texts: list[str], column: str = "text") -> Path:
    lines = [json.dumps({"id": i, column: t}) if t else "" for i, t in enumerate(texts)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def write_parquet(path: Path, texts: Sequence[str | None], column: str = "text") -> Path:
    """Parquet with an extra null text and row groups of 3 rows."""
    values = [*texts[:2], None, *texts[2:]]
    table = pa.table({"id": pa.array(range(len(values)), pa.int64()), column: values})
    pq.write_table(table, path, row_group_size=3)
    return path


def _stream_file(path: Path, table: pa.Table) -> None:
    """An Arrow IPC stream, batches of 2 rows, schema metadata as datasets' ArrowWriter."""
    features = {name: {"dtype": "string", "_type": "Value"} for name in table.column_names}
    meta = {"huggingface": json.dumps({"info": {"features": features}})}
    schema = table.schema.with_metadata(meta)
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
        for batch in table.cast(schema).to_batches(max_chunksize=2):
            writer.write_batch(batch)


def write_hf(
    directory: Path, texts: list[str], column: str = "text", order: tuple[int, int] = (0, 1)
) -> Path:
    """A save_to_disk layout: two data-0000k-of-00002.arrow streams listed in state.json.

    ``order`` gives which shard holds the first half of ``texts`` (the listing order in
    state.json always follows the text order).
    """
    directory.mkdir(parents=True)
    half = len(texts) // 2
    names = [f"data-{k:05d}-of-00002.arrow" for k in order]
    for name, part in zip(names, (texts[:half], texts[half:]), strict=True):
        table = pa.table({column: pa.array(part, pa.string()), "n": [len(t) for t in part]})
        _stream_file(directory / name, table)
    state = {
        "_data_files": [{"filename": name} for name in names],
        "_fingerprint": "0123456789abcdef",
        "_format_columns": None,
        "_format_kwargs": {},
        "_format_type": None,
        "_output_all_columns": False,
        "_split": "train",
    }
    (directory / "state.json").write_text(json.dumps(state, indent=2, sort_keys=True))
    (directory / "dataset_info.json").write_text(json.dumps({"features": {}}))
    return directory


@pytest.fixture()
def sources(tmp_path: Path) -> dict[str, str | Path]:
    parquet = write_parquet(tmp_path / "corpus.parquet", TEXTS)
    txt = write_txt(tmp_path / "corpus.txt", TEXTS)
    return {
        "txt": txt,
        "jsonl": write_jsonl(tmp_path / "corpus.jsonl", TEXTS),
        "parquet": parquet,
        "parquet_uri": parquet.as_uri(),
        "txt_uri": txt.as_uri(),
        "hf": write_hf(tmp_path / "hf_train", TEXTS),
    }


# ----------------------------------------------------------------------------- documents


@pytest.mark.parametrize("kind", KINDS)
def test_every_kind_yields_the_same_documents(sources: dict[str, str | Path], kind: str) -> None:
    assert list(iter_documents([sources[kind]])) == DOCS
    assert count_documents([sources[kind]]) == len(DOCS)


def test_sources_are_read_in_order(sources: dict[str, str | Path], tmp_path: Path) -> None:
    other = write_txt(tmp_path / "other.txt", ["first", "second"])
    docs = list(iter_documents([sources["hf"], other, sources["parquet_uri"]]))
    assert docs == [*DOCS, "first", "second", *DOCS]


def test_txt_keeps_spaces_and_skips_blank_crlf_lines(tmp_path: Path) -> None:
    path = tmp_path / "crlf.txt"
    path.write_bytes(b"a\r\n\r\n  b \r\n \t \r\nc")
    assert list(iter_documents([path])) == ["a", "  b ", "c"]


@pytest.mark.parametrize("kind", ["jsonl", "parquet", "hf"])
def test_text_column_is_configurable(tmp_path: Path, kind: str) -> None:
    writer = {"jsonl": write_jsonl, "parquet": write_parquet, "hf": write_hf}[kind]
    suffix = {"jsonl": ".jsonl", "parquet": ".parquet", "hf": ""}[kind]
    source = writer(tmp_path / f"body{suffix}", TEXTS, column="body")
    assert list(iter_documents([source], text_column="body")) == DOCS
    with pytest.raises(CorpusError, match="'text'"):
        list(iter_documents([source]))


def test_parquet_streams_small_batches_over_row_groups(
    sources: dict[str, str | Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    assert pq.ParquetFile(sources["parquet"]).metadata.num_row_groups > 1

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("the whole file must not be read at once")

    monkeypatch.setattr(pq.ParquetFile, "read", refuse)
    monkeypatch.setattr(pq, "read_table", refuse)
    monkeypatch.setattr(corpus_mod, "_BATCH_ROWS", 2)
    assert list(iter_documents([sources["parquet"]])) == DOCS


def test_hf_data_files_follow_state_json_order(tmp_path: Path) -> None:
    # the first half of the texts lives in data-00001-..., listed first in state.json
    directory = write_hf(tmp_path / "reordered", TEXTS, order=(1, 0))
    assert json.loads((directory / "state.json").read_text())["_data_files"][0] == {
        "filename": "data-00001-of-00002.arrow"
    }
    assert list(iter_documents([directory])) == DOCS


def test_datasetdict_split_directory_is_accepted(tmp_path: Path) -> None:
    root = tmp_path / "dd"
    write_hf(root / "train", TEXTS)
    (root / "dataset_dict.json").write_text(json.dumps({"splits": ["train"]}))
    assert list(iter_documents([root / "train"])) == DOCS


# ----------------------------------------------------------------------------- fingerprint


def _old_fingerprint(paths: list[Path]) -> str:
    """The formula stats caches were keyed with before corpus.py: per file, its name, a
    NUL, and the hex sha256 of its bytes."""
    digest = hashlib.sha256()
    for path in paths:
        digest.update(path.name.encode() + b"\0")
        digest.update(hashlib.sha256(path.read_bytes()).hexdigest().encode())
    return digest.hexdigest()


def test_fingerprint_keeps_the_old_formula_for_text_files(
    sources: dict[str, str | Path],
) -> None:
    paths = [Path(sources["txt"]), Path(sources["jsonl"])]
    assert corpus_fingerprint(paths) == _old_fingerprint(paths)
    assert corpus_fingerprint([str(p) for p in paths]) == _old_fingerprint(paths)
    assert corpus_fingerprint(paths[::-1]) == _old_fingerprint(paths[::-1])
    assert corpus_fingerprint(paths) != corpus_fingerprint(paths[::-1])


@pytest.mark.parametrize("kind", KINDS)
def test_fingerprint_is_stable_and_follows_bytes(
    sources: dict[str, str | Path], tmp_path: Path, kind: str
) -> None:
    source = sources[kind]
    before = corpus_fingerprint([source])
    assert corpus_fingerprint([source]) == before
    assert corpus_fingerprint([source], text_column="body") != before
    changed = [*TEXTS[:-1], "a different mat"]
    if kind in ("txt", "txt_uri"):
        write_txt(tmp_path / "corpus.txt", changed)
    elif kind == "jsonl":
        write_jsonl(tmp_path / "corpus.jsonl", changed)
    elif kind == "hf":
        table = pa.table({"text": pa.array(changed[4:]), "n": [len(t) for t in changed[4:]]})
        _stream_file(tmp_path / "hf_train" / "data-00001-of-00002.arrow", table)
    else:
        write_parquet(tmp_path / "corpus.parquet", changed)
    assert corpus_fingerprint([source]) != before


def test_fingerprint_of_uri_equals_local_path(sources: dict[str, str | Path]) -> None:
    assert corpus_fingerprint([sources["parquet_uri"]]) == corpus_fingerprint([sources["parquet"]])


def test_source_name_is_the_base_name(sources: dict[str, str | Path]) -> None:
    names = {kind: source_name(source) for kind, source in sources.items()}
    assert names == {
        "txt": "corpus.txt",
        "jsonl": "corpus.jsonl",
        "parquet": "corpus.parquet",
        "parquet_uri": "corpus.parquet",
        "txt_uri": "corpus.txt",
        "hf": "hf_train",
    }
    assert source_name("s3://bucket/dd/train/") == "train"
    assert source_name("dd/train/") == "train"


def test_fingerprint_of_hf_dir_covers_its_data_files(
    sources: dict[str, str | Path], tmp_path: Path
) -> None:
    """Each data file's name and bytes, in state.json order (not the directory name)."""
    hf = Path(sources["hf"])
    copy = tmp_path / "renamed_dir"
    copy.mkdir()
    for f in hf.iterdir():
        (copy / f.name).write_bytes(f.read_bytes())
    assert corpus_fingerprint([copy]) == corpus_fingerprint([hf])
    state = json.loads((copy / "state.json").read_text())
    state["_data_files"].reverse()
    (copy / "state.json").write_text(json.dumps(state))
    assert corpus_fingerprint([copy]) != corpus_fingerprint([hf])


# ----------------------------------------------------------------------------- selection


def test_read_documents_selects_exactly(sources: dict[str, str | Path]) -> None:
    srcs = [sources["txt"], sources["hf"], sources["parquet"]]
    every = list(iter_documents(srcs))
    for indices in ([], [0], [0, 3, 4, 5, 11], [len(every) - 1], list(range(len(every)))):
        assert list(read_documents(srcs, indices)) == [(i, every[i]) for i in indices]


def test_read_documents_stops_after_the_last_index(
    sources: dict[str, str | Path], tmp_path: Path
) -> None:
    broken = tmp_path / "broken.jsonl"
    broken.write_text("{not json\n")
    srcs = [sources["txt"], broken]
    assert list(read_documents(srcs, [1, len(DOCS) - 1])) == [(1, DOCS[1]), (5, DOCS[5])]
    with pytest.raises(CorpusError, match=r"broken\.jsonl:1: invalid JSON"):
        list(read_documents(srcs, [len(DOCS)]))


def test_read_documents_rejects_bad_indices(sources: dict[str, str | Path]) -> None:
    srcs = [sources["txt"]]
    with pytest.raises(ValueError, match=r"strictly increasing: indices\[1\]=1 <= 3"):
        list(read_documents(srcs, [3, 1]))
    with pytest.raises(ValueError, match="strictly increasing"):
        list(read_documents(srcs, [2, 2]))
    with pytest.raises(ValueError, match=">= 0"):
        list(read_documents(srcs, [-1]))
    past_end = rf"index 99 is past the end .*\({len(DOCS)} documents in .*corpus\.txt"
    with pytest.raises(CorpusError, match=past_end):
        list(read_documents(srcs, [1, 99]))


# ----------------------------------------------------------------------------- errors


def test_missing_and_unknown_sources_are_named(tmp_path: Path) -> None:
    with pytest.raises(CorpusError, match=r"nope\.txt: no such corpus file"):
        iter_documents([tmp_path / "nope.txt"])
    csv = tmp_path / "corpus.csv"
    csv.write_text("text\nhello\n")
    with pytest.raises(CorpusError, match=r"corpus\.csv: unsupported corpus suffix '\.csv'") as e:
        iter_documents([csv])
    for kind in (".txt", ".jsonl", ".parquet", "save_to_disk"):
        assert kind in str(e.value)
    with pytest.raises(CorpusError, match=r"nosuchfs://bucket/x\.txt: not a URI"):
        corpus_fingerprint(["nosuchfs://bucket/x.txt"])
    with pytest.raises(TypeError, match="sequence of paths"):
        iter_documents(str(csv))  # type: ignore[arg-type]


def test_jsonl_errors_name_file_line_and_field(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "ok"}\n\n{"txt": "typo"}\n')
    with pytest.raises(CorpusError, match=r"bad\.jsonl:3: .*'text' field .*did you mean 'txt'"):
        list(iter_documents([path]))
    path.write_text('{"body": "ok"}\n{"body": 5}\n')
    with pytest.raises(CorpusError, match=r"bad\.jsonl:2: .*string 'body' field \(it is int\)"):
        list(iter_documents([path], text_column="body"))
    path.write_text('{"text": "ok"}\n{oops\n')
    with pytest.raises(CorpusError, match=r"bad\.jsonl:2: invalid JSON"):
        list(iter_documents([path]))
    latin = tmp_path / "latin.txt"
    latin.write_bytes("caf\xe9\n".encode("latin-1"))
    with pytest.raises(CorpusError, match=r"latin\.txt: not UTF-8"):
        list(iter_documents([latin]))


def test_parquet_column_errors_name_file_and_column(tmp_path: Path) -> None:
    path = write_parquet(tmp_path / "p.parquet", TEXTS, column="texts")
    with pytest.raises(CorpusError, match=r"p\.parquet: no column 'text' .*did you mean 'texts'"):
        list(iter_documents([path]))
    ints = tmp_path / "ints.parquet"
    pq.write_table(pa.table({"text": [1, 2]}), ints)
    with pytest.raises(CorpusError, match=r"ints\.parquet: column 'text' has type int64"):
        list(iter_documents([ints]))
    garbage = tmp_path / "garbage.parquet"
    garbage.write_bytes(b"not parquet at all")
    with pytest.raises(CorpusError, match=r"garbage\.parquet: not a readable Parquet file"):
        list(iter_documents([garbage]))


def test_hf_column_errors_name_the_data_file(tmp_path: Path) -> None:
    directory = write_hf(tmp_path / "hf", TEXTS, column="texts")
    first = r"hf/data-00000-of-00002\.arrow"
    with pytest.raises(CorpusError, match=rf"{first}: no column 'text' .*did you mean 'texts'"):
        list(iter_documents([directory]))
    with pytest.raises(CorpusError, match=rf"{first}: column 'n' has type int64"):
        list(iter_documents([directory], text_column="n"))


def test_hf_state_json_errors_name_the_field(tmp_path: Path) -> None:
    directory = write_hf(tmp_path / "hf", TEXTS)
    state_path = directory / "state.json"
    state = json.loads(state_path.read_text())
    state_path.write_text(json.dumps({**state, "_data_files": "data.arrow"}))
    with pytest.raises(CorpusError, match=r"hf/state\.json: field '_data_files' must be a list"):
        iter_documents([directory])
    bad = {**state, "_data_files": [state["_data_files"][0], {"filename": "../x.arrow"}]}
    state_path.write_text(json.dumps(bad))
    with pytest.raises(CorpusError, match=r"state\.json: field '_data_files\[1\]\.filename'"):
        corpus_fingerprint([directory])
    missing = {**state, "_data_files": [*state["_data_files"], {"filename": "gone.arrow"}]}
    state_path.write_text(json.dumps(missing))
    with pytest.raises(CorpusError, match=r"'_data_files\[2\]\.filename' .*hf/gone\.arrow"):
        iter_documents([directory])
    state_path.write_text("{")
    with pytest.raises(CorpusError, match=r"hf/state\.json: cannot read JSON"):
        iter_documents([directory])


def test_hf_data_files_must_be_arrow_streams(tmp_path: Path) -> None:
    directory = write_hf(tmp_path / "hf", TEXTS)
    data = directory / "data-00001-of-00002.arrow"
    table = pa.table({"text": ["x", "y"]})
    with pa.OSFile(str(data), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)  # the random-access IPC *file* format, not a stream
    with pytest.raises(CorpusError, match=r"data-00001-of-00002\.arrow: not an Arrow IPC stream"):
        list(iter_documents([directory]))


def test_truncated_arrow_stream_names_the_row(tmp_path: Path) -> None:
    directory = write_hf(tmp_path / "hf", TEXTS)
    data = directory / "data-00000-of-00002.arrow"
    data.write_bytes(data.read_bytes()[:-40])  # cut inside the last record batch
    with pytest.raises(CorpusError, match=r"data-00000-of-00002\.arrow: .* at row 2"):
        list(iter_documents([directory]))


def test_datasetdict_is_refused_with_its_splits(tmp_path: Path) -> None:
    root = tmp_path / "dd"
    write_hf(root / "train", TEXTS)
    write_hf(root / "test", TEXTS[:2])
    (root / "dataset_dict.json").write_text(json.dumps({"splits": ["train", "test"]}))
    with pytest.raises(CorpusError, match=r"DatasetDict .*splits: train, test.*DIR/<split>") as e:
        iter_documents([root])
    assert f"{root}/train" in str(e.value)
    plain = tmp_path / "plain"
    plain.mkdir()
    with pytest.raises(CorpusError, match=r"plain: a directory without state\.json"):
        iter_documents([plain])
