"""seqedit.storage: the same operations on a local folder and on S3 (a local moto server)."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest

from seqedit.storage import Location, StorageError, location


@pytest.fixture(params=["local", "s3"])
def root(request: pytest.FixtureRequest, tmp_path: Path) -> Location:
    if request.param == "local":
        return location(tmp_path / "root")
    return location(request.getfixturevalue("s3_root"))


def test_write_read_list_delete(root: Location) -> None:
    assert not root.exists() and root.iterdir() == []
    (root / "b.txt").write_text("bee")
    (root / "sub" / "a.bin").write_bytes(b"\x00\x01")
    (root / "sub" / "c.parquet").write_with(lambda tmp: tmp.write_bytes(b"pq"))
    assert root.is_dir() and (root / "b.txt").is_file() and not (root / "b.txt").is_dir()
    assert (root / "b.txt").read_text() == "bee"
    assert [e.name for e in root.iterdir()] == ["b.txt", "sub"]
    assert [e.name for e in (root / "sub").glob("*.parquet")] == ["c.parquet"]
    with (root / "sub" / "a.bin").local_copy() as local:
        assert local.read_bytes() == b"\x00\x01"
    (root / "b.txt").write_text("overwritten")
    assert (root / "b.txt").read_text() == "overwritten"
    (root / "b.txt").unlink()
    (root / "b.txt").unlink(missing_ok=True)
    with pytest.raises(FileNotFoundError, match=r"b\.txt"):
        (root / "b.txt").unlink()
    with pytest.raises(FileNotFoundError, match=r"b\.txt"):
        (root / "b.txt").read_bytes()
    with pytest.raises(FileNotFoundError, match=r"b\.txt"), (root / "b.txt").local_copy():
        pass
    (root / "sub").delete_tree()
    assert not (root / "sub").exists()
    (root / "sub").delete_tree()  # gone already: nothing to do


def test_uri_round_trips_through_str_and_pickle(root: Location) -> None:
    child = root / "x" / "y.safetensors"
    assert location(str(child)) == child
    assert pickle.loads(pickle.dumps(child)) == child
    assert child.parent.parent == root and child.name == "y.safetensors"
    child.write_text("z")
    assert location(str(child)).read_text() == "z"  # a fresh resolve reaches the same object


def test_failed_write_leaves_the_old_file(root: Location) -> None:
    target = root / "state.json"
    target.write_text("old")

    def explode(tmp: Path) -> None:
        tmp.write_text("partial")
        raise RuntimeError("writer died")

    with pytest.raises(RuntimeError, match="writer died"):
        target.write_with(explode)
    assert target.read_text() == "old"
    assert [e.name for e in root.iterdir()] == ["state.json"]  # no stray temp file


def test_local_forms(tmp_path: Path) -> None:
    plain = location(tmp_path / "a")
    assert plain.is_local and plain.local_path == tmp_path / "a"
    assert location(f"file://{tmp_path}/a").local_path == tmp_path / "a"
    assert str(plain) == str(tmp_path / "a")
    with pytest.raises(StorageError, match="not a local path"):
        _ = location("s3://bucket/x?endpoint_override=127.0.0.1:1&scheme=http").local_path


def test_unknown_scheme_is_named() -> None:
    with pytest.raises(StorageError, match=r"nope://bucket.*not a storage location"):
        location("nope://bucket/runs")
