"""The metric lake: atomic parts, views over done attempts only, read-only queries."""

from __future__ import annotations

from pathlib import Path

import duckdb
import pytest

from seqedit.methods.metrics import score
from seqedit.pipeline.campaign_dir.parts import write_part
from seqedit.pipeline.campaign_dir.state import CampaignState, ShardState
from seqedit.pipeline.results.views import VIEWS, QueryError, connect, query
from seqedit.schemas.tables import EditRow, EvalRow
from tests.pipeline.rows import edit_row


def _row(step: int, case_id: int) -> EditRow:
    return edit_row(step, case_id)


def _campaign(tmp_path: Path, shards: list[ShardState]) -> Path:
    CampaignState(campaign="c", spec_hash="h", shards=shards).save(tmp_path)
    return tmp_path


def test_views_show_only_the_done_attempt_of_each_shard(tmp_path: Path) -> None:
    shards = [
        ShardState(index=0, start=0, stop=2, status="done", attempt=1, done_attempt=1),
        ShardState(index=1, start=2, stop=4, status="failed", attempt=0),
    ]
    root = _campaign(tmp_path, shards)
    write_part(root, "edits", 0, 0, 0, [_row(0, 10), _row(1, 11)])  # failed first attempt
    write_part(root, "edits", 0, 1, 0, [_row(0, 10), _row(1, 11)])  # the rerun that counts
    write_part(root, "edits", 1, 0, 0, [_row(2, 12)])  # shard not done: invisible
    result = query(root, "SELECT step, shard, attempt FROM edits ORDER BY step").to_pylist()
    assert result == [
        {"step": 0, "shard": 0, "attempt": 1},
        {"step": 1, "shard": 0, "attempt": 1},
    ]


def test_empty_campaign_has_typed_empty_views(tmp_path: Path) -> None:
    root = _campaign(tmp_path, [ShardState(index=0, start=0, stop=1)])
    table = query(root, "SELECT * FROM evals")
    assert table.num_rows == 0
    assert "es" in table.column_names and "protocol" in table.column_names


@pytest.mark.parametrize(
    "sql",
    [
        "DELETE FROM edits",
        "COPY (SELECT * FROM edits) TO 'out.csv'",
        "CREATE TABLE x AS SELECT 1",
        "DROP VIEW edits",
        "ATTACH 'other.db'",
        "SET enable_external_access = true",
        "SELECT 1; DELETE FROM edits",
    ],
)
def test_query_refuses_statements_that_write(tmp_path: Path, sql: str) -> None:
    root = _campaign(tmp_path, [ShardState(index=0, start=0, stop=1)])
    with pytest.raises(QueryError, match="not allowed"):
        query(root, sql)


def test_query_cannot_read_outside_the_lake(tmp_path: Path) -> None:
    root = _campaign(tmp_path / "c", [ShardState(index=0, start=0, stop=1)])
    (tmp_path / "secret.csv").write_text("a\n1\n")
    with pytest.raises(QueryError, match="query failed"):
        query(root, f"SELECT * FROM read_csv('{tmp_path / 'secret.csv'}')")


def test_parts_are_written_atomically_with_no_leftovers(tmp_path: Path) -> None:
    path = write_part(tmp_path, "edits", 0, 0, 3, [_row(0, 1)])
    assert path.name == "part-00003.parquet"
    assert [p.name for p in path.parent.iterdir()] == ["part-00003.parquet"]


def test_write_part_checks_the_row_type(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="EvalRow"):
        write_part(tmp_path, "evals", 0, 0, 0, [_row(0, 1)])


def _eval(case_id: int, n: int, es: float, ps: float | None, ns: float) -> EvalRow:
    return EvalRow(campaign="c", protocol="retention", n_edits_applied=n, case_id=case_id,
                   edit_step=case_id, metric_version="1", es=es, ps=ps, ns=ns, em=0.5,
                   pm=None, nm=0.25, rewrite_acc=1.0, n_paraphrases=1,
                   n_neighbors=1)  # fmt: skip


def test_shards_and_curves_views(tmp_path: Path) -> None:
    shards = [
        ShardState(index=0, start=0, stop=2, status="done", done_attempt=0),
        ShardState(index=1, start=2, stop=4, status="failed", attempt=2, error="boom"),
    ]
    root = _campaign(tmp_path, shards)
    write_part(root, "evals", 0, 0, 0, [_eval(0, 2, 1.0, 1.0, 0.5), _eval(1, 2, 0.0, 0.5, 1.0),
                                        _eval(0, 4, 1.0, None, 0.0)])  # fmt: skip
    sql = "SELECT index, status, attempt, error FROM shards ORDER BY index"
    assert query(root, sql).to_pylist() == [
        {"index": 0, "status": "done", "attempt": 0, "error": None},
        {"index": 1, "status": "failed", "attempt": 2, "error": "boom"},
    ]  # fmt: skip
    curves = query(root, "SELECT * FROM curves ORDER BY n_edits_applied").to_pylist()
    # at 2 edits: ES 0.5, PS 0.75, NS 0.75 -> harmonic mean 3 / (2 + 4/3 + 4/3)
    assert curves[0]["records"] == 2 and curves[0]["es"] == 0.5
    assert curves[0]["score"] == pytest.approx(score(0.5, 0.75, 0.75))
    assert curves[0]["pm"] is None and curves[0]["nm"] == 0.25
    assert curves[1]["ps"] is None and curves[1]["score"] is None  # no paraphrases scored


def _two_campaigns(tmp_path: Path) -> tuple[Path, Path]:
    """Campaign a with 2 edits, campaign b with 3 edits and one eval."""
    done = [ShardState(index=0, start=0, stop=3, status="done", done_attempt=0)]
    a = _campaign(tmp_path / "a", done)
    b = _campaign(tmp_path / "b", done)
    write_part(a, "edits", 0, 0, 0, [_row(0, 10), _row(1, 11)])
    write_part(b, "edits", 0, 0, 0, [_row(0, 20), _row(1, 21), _row(2, 22)])
    write_part(b, "evals", 0, 0, 0, [_eval(20, 3, 1.0, 1.0, 0.5)])
    return a, b


def test_other_campaigns_get_every_view_in_their_own_schema(tmp_path: Path) -> None:
    a, b = _two_campaigns(tmp_path)
    sql = """SELECT (SELECT count(*) FROM edits) AS a_edits, (SELECT count(*) FROM b.edits)
             AS b_edits, (SELECT count(*) FROM evals) AS a_evals,
             (SELECT records FROM b.curves) AS b_records, (SELECT count(*) FROM c.edits) AS c"""
    assert query(a, sql, others={"b": b, "c": a}).to_pylist() == [
        {"a_edits": 2, "b_edits": 3, "a_evals": 0, "b_records": 1, "c": 2}
    ]
    for view in VIEWS:  # typed even where one has no rows (its own registered empty tables)
        mine = query(a, f"SELECT * FROM {view}", others={"b": b}).schema
        theirs = query(a, f"SELECT * FROM b.{view}", others={"b": b}).schema
        assert {f.name: f.type for f in theirs} == {f.name: f.type for f in mine}


@pytest.mark.parametrize(
    "sql",
    [
        "DELETE FROM b.edits",
        "COPY (SELECT * FROM b.edits) TO 'out.csv'",
        "COPY b.edits TO 'out.parquet'",
        "DROP SCHEMA b CASCADE",
        "SELECT 1 FROM b.edits; DELETE FROM edits",
    ],
)
def test_the_multi_campaign_path_still_refuses_statements_that_write(
    tmp_path: Path, sql: str
) -> None:
    a, b = _two_campaigns(tmp_path)
    with pytest.raises(QueryError, match="not allowed"):
        query(a, sql, others={"b": b})


def test_the_multi_campaign_connection_stays_sandboxed(tmp_path: Path) -> None:
    """Nothing outside the two lakes can be read or written, and the configuration is
    locked. (DuckDB's sandbox cannot make the lakes themselves read-only: a COPY into one is
    refused by `query`'s statement check, tested above.)"""
    a, b = _two_campaigns(tmp_path)
    con = connect(a, others={"b": b})
    try:
        for sql in [
            f"SELECT * FROM read_json('{b / 'state.json'}')",  # b's folder, outside its lake
            f"COPY (SELECT * FROM b.edits) TO '{b / 'out.csv'}'",  # b's folder, outside its lake
            "SET enable_external_access = true",
            f"SET allowed_directories = ['{tmp_path}/']",
        ]:
            with pytest.raises(duckdb.Error):
                con.execute(sql)
    finally:
        con.close()
    assert not (b / "out.csv").exists()


@pytest.mark.parametrize(
    ("name", "problem"),
    [("1b", "letters, digits"), ("b-2", "letters, digits"), ("curves", "view name"),
     ("Edits", "view name"), ("main", "reserved"), ("select", "reserved")],
)  # fmt: skip
def test_other_campaign_names_must_be_plain_identifiers(
    tmp_path: Path, name: str, problem: str
) -> None:
    a, b = _two_campaigns(tmp_path)
    with pytest.raises(ValueError, match=problem):
        query(a, "SELECT 1", others={name: b})


def test_other_campaign_dirs_are_checked(tmp_path: Path) -> None:
    a, b = _two_campaigns(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"campaign 'b': .*missing: no such directory"):
        query(a, "SELECT 1", others={"b": tmp_path / "missing"})
    with pytest.raises(FileNotFoundError, match=r"campaign 'b': .*no campaign state here"):
        query(a, "SELECT 1", others={"b": b / "tables"})
    with pytest.raises(ValueError, match="given twice"):
        query(a, "SELECT 1", others={"b": b, "B": b})
