"""`seqedit compact`: parts of done partitions merged, every view unchanged, crash safe."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import duckdb
import pyarrow.parquet as pq
import pytest

from seqedit.pipeline.campaign_dir import compact as compact_module
from seqedit.pipeline.campaign_dir.compact import SIDECAR_PREFIX, compact, list_parts, partition_dir
from seqedit.pipeline.campaign_dir.lock import CampaignBusyError, driver_lock
from seqedit.pipeline.campaign_dir.parts import write_part
from seqedit.pipeline.campaign_dir.state import CampaignState, ShardState
from seqedit.pipeline.cli.main import main
from seqedit.pipeline.results.views import VIEWS, connect, query
from seqedit.schemas.tables import TABLES, EvalRow, HealthRow
from tests.pipeline.rows import edit_row


def _eval(case_id: int, n: int, es: float) -> EvalRow:
    return EvalRow(campaign="c", protocol="retention", n_edits_applied=n, case_id=case_id,
                   edit_step=case_id, metric_version="1", es=es, ps=0.5, ns=1 - es, em=0.2,
                   pm=0.1, nm=0.3, rewrite_acc=1.0, n_paraphrases=1,
                   n_neighbors=1)  # fmt: skip


def _check(step: int, name: str, value: float) -> HealthRow:
    return HealthRow(campaign="c", step=step, case_id=step, check_name=name, value=value,
                     threshold=None, passed=True, action="none")  # fmt: skip


@pytest.fixture()
def lake(small_campaign: Path, tmp_path: Path) -> Path:
    """The shared small campaign, copied, with more shards and several parts per partition.

    shard 0 attempt 0 (done): edits 3 parts (one written without the `retries` column, as an
    older writer would), evals 3 parts, health 2 parts. shard 1: attempt 0 superseded (2
    parts, never visible), attempt 1 done (edits 3 parts, evals 1 part). shard 2 failed (2
    parts, never visible)."""
    root = tmp_path / "campaign"
    shutil.copytree(small_campaign, root, ignore=shutil.ignore_patterns("driver.lock"))
    state = CampaignState.load(root)
    state.shards += [
        ShardState(index=1, start=3, stop=6, status="done", attempt=1, done_attempt=1),
        ShardState(index=2, start=6, stop=8, status="failed", attempt=0, error="boom"),
    ]
    state.save(root)
    write_part(root, "edits", 0, 0, 1, [edit_row(10, 10)])
    old = pq.ParquetFile(write_part(root, "edits", 0, 0, 2, [edit_row(11, 11)]).local_path).read()
    pq.write_table(
        old.drop_columns(["retries"]), partition_dir(root, "edits", 0, 0) / "part-00002.parquet"
    )
    write_part(root, "evals", 0, 0, 1, [_eval(0, 3, 0.5), _eval(1, 3, 1.0)])
    write_part(root, "evals", 0, 0, 7, [_eval(2, 3, 0.0)])  # part numbers need not be dense
    write_part(root, "health", 0, 0, 1, [_check(2, "retention", 0.25)])
    for attempt in (0, 1):
        for part in range(3 if attempt else 2):
            rows = [edit_row(3 + part, 30 + part, seconds=float(attempt))]
            write_part(root, "edits", 1, attempt, part, rows)
    write_part(root, "evals", 1, 1, 0, [_eval(3, 5, 1.0)])
    for part in range(2):
        write_part(root, "edits", 2, 0, part, [edit_row(6 + part, 60 + part)])
    return root


def _snapshot(root: Path) -> dict[str, tuple[list[str], list[Any]]]:
    """Every view: its columns and its rows, sorted."""
    views = {}
    for view in VIEWS:
        table = query(root, f"SELECT * FROM {view}")
        views[view] = (table.column_names, sorted(table.to_pylist(), key=repr))
    return views


def _files(root: Path) -> dict[str, float]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("*.parquet")}


def test_compact_merges_the_parts_of_done_partitions_and_every_view_answers_as_before(
    lake: Path,
) -> None:
    before = _snapshot(lake)
    in_file_order = query(lake, "SELECT shard, step, case_id FROM edits").to_pylist()
    assert len(before["edits"][1]) == 3 + 2 + 3 and before["edits"][1][0]["retries"] is not None
    originals = [pq.ParquetFile(p).read() for p in list_parts(lake, "edits", 0, 0)]
    untouched = {
        name: mtime for name, mtime in _files(lake).items()
        if "shard=2" in name or "shard=1/attempt=0" in name or "evals/shard=1" in name
    }  # fmt: skip

    report = compact(lake)

    assert _snapshot(lake) == before
    assert query(lake, "SELECT shard, step, case_id FROM edits").to_pylist() == in_file_order
    counts = {
        t.table: (t.parts_before, t.parts_after, t.partitions_compacted) for t in report.tables
    }
    expected = {"edits": (6, 2, 2), "evals": (4, 2, 1), "health": (2, 1, 1)}
    assert counts == {table: expected.get(table, (0, 0, 0)) for table in TABLES}
    assert report.partitions_compacted == 4 and report.leftovers_removed == []
    assert all(t.bytes_after < t.bytes_before for t in report.tables if t.partitions_compacted)
    # one part, numbered after the last original, rows in file order (nulls where missing)
    (merged,) = list_parts(lake, "edits", 0, 0)
    assert merged.name == "part-00003.parquet"
    rows = pq.ParquetFile(merged).read().to_pylist()
    expected = [r for t in originals for r in t.to_pylist()]
    assert rows == [e | {"retries": e.get("retries")} for e in expected]
    assert [p.name for p in list_parts(lake, "evals", 0, 0)] == ["part-00008.parquet"]
    assert {n: m for n, m in _files(lake).items() if n in untouched} == untouched
    assert not list(lake.glob(f"tables/*/shard=*/{SIDECAR_PREFIX}*"))


def test_a_second_compact_is_a_no_op(lake: Path) -> None:
    compact(lake)
    files, before = _files(lake), _snapshot(lake)
    report = compact(lake)
    assert report.partitions_compacted == 0
    assert all(t.parts_before == t.parts_after for t in report.tables)
    assert _files(lake) == files and _snapshot(lake) == before


def test_a_campaign_with_one_part_per_partition_is_left_alone(
    small_campaign: Path, tmp_path: Path
) -> None:
    root = tmp_path / "c"
    shutil.copytree(small_campaign, root, ignore=shutil.ignore_patterns("driver.lock"))
    files = _files(root)
    assert compact(root).partitions_compacted == 0 and _files(root) == files


def test_compact_refuses_while_a_driver_holds_the_lock(lake: Path) -> None:
    files = _files(lake)
    with driver_lock(lake), pytest.raises(CampaignBusyError, match="compact refuses"):
        compact(lake)
    assert _files(lake) == files
    assert compact(lake).partitions_compacted == 4  # the lock is free again


def test_compact_of_a_folder_that_is_no_campaign(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no campaign state here"):
        compact(tmp_path)
    assert list(tmp_path.iterdir()) == []  # not even a lock file


def test_exchange_swaps_two_folders_in_one_step(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "a" / "x").write_text("from a")
    compact_module._exchange(tmp_path / "a", tmp_path / "b")
    assert list((tmp_path / "a").iterdir()) == [] and (tmp_path / "b" / "x").read_text() == "from a"
    with pytest.raises(FileNotFoundError):
        compact_module._exchange(tmp_path / "a", tmp_path / "missing")


class Crash(Exception):
    """A simulated crash of the compact process."""


def _write_half(target: Path, merged: object) -> None:
    target.write_bytes(b"PAR1 a part cut short")
    raise Crash


@pytest.mark.parametrize("step", ["while writing", "before the swap", "after the swap"])
def test_a_crash_at_any_step_shows_no_reader_wrong_rows_and_the_next_compact_recovers(
    lake: Path, monkeypatch: pytest.MonkeyPatch, step: str
) -> None:
    before = _snapshot(lake)
    seen: list[bool] = []
    real_exchange = compact_module._exchange

    def crash_before_swap(a: Path, b: Path) -> None:
        seen.append(_snapshot(lake) == before)
        raise Crash

    def crash_after_swap(a: Path, b: Path) -> None:
        seen.append(_snapshot(lake) == before)
        real_exchange(a, b)
        seen.append(_snapshot(lake) == before)
        raise Crash

    patches = {"while writing": ("_write_merged", _write_half),
               "before the swap": ("_exchange", crash_before_swap),
               "after the swap": ("_exchange", crash_after_swap)}  # fmt: skip
    with monkeypatch.context() as patched:
        patched.setattr(compact_module, *patches[step])
        with pytest.raises(Crash):
            compact(lake)
    assert all(seen)
    leftovers = list(lake.glob(f"tables/*/shard=*/{SIDECAR_PREFIX}*"))
    assert len(leftovers) == 1
    assert _snapshot(lake) == before

    report = compact(lake)

    assert report.leftovers_removed == ["edits/shard=0/.compact-attempt=0"]
    assert report.partitions_compacted == (3 if step == "after the swap" else 4)
    assert all(len(list_parts(lake, "edits", s, 0 if s == 0 else 1)) == 1 for s in (0, 1))
    assert not leftovers[0].exists()
    assert _snapshot(lake) == before


def test_a_reader_that_listed_the_parts_before_fails_rather_than_mixing_rows(lake: Path) -> None:
    con = connect(lake)
    try:
        compact(lake)
        with pytest.raises(duckdb.Error, match="No such file"):
            con.sql("SELECT count(*) FROM edits").fetchall()
    finally:
        con.close()


def test_cli_compact_prints_a_summary(lake: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["compact", str(lake)]) == 0
    out = capsys.readouterr().out
    assert "edits: 6 -> 2 parts" in out and "4 partitions compacted" in out
    with driver_lock(lake):
        assert main(["compact", str(lake)]) == 2
    assert "compact refuses" in capsys.readouterr().err
