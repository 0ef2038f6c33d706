"""Every query of docs/sql-cookbook.md runs on a small campaign and answers what it says."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from seqedit.pipeline.store import query

COOKBOOK = Path(__file__).resolve().parents[2] / "docs" / "sql-cookbook.md"
QUERIES = re.findall(r"```sql\n(.*?)```", COOKBOOK.read_text(encoding="utf-8"), re.DOTALL)


def test_the_cookbook_has_its_queries() -> None:
    assert len(QUERIES) >= 8


@pytest.mark.parametrize("sql", QUERIES, ids=lambda q: q.split("\n")[0][:40])
def test_every_cookbook_query_runs_and_finds_rows(small_campaign: Path, sql: str) -> None:
    assert query(small_campaign, sql).num_rows >= 1


def test_the_answers_are_right(small_campaign: Path) -> None:
    by_title = dict(zip(re.findall(r"^## (.+)$", COOKBOOK.read_text(), re.MULTILINE), QUERIES,
                        strict=True))  # fmt: skip
    forgotten = by_title["Edits that worked when made, then were forgotten by the end"]
    assert [r["case_id"] for r in query(small_campaign, forgotten).to_pylist()] == [1]
    lost = by_title["When each edit was lost: the first retention point that no longer holds it"]
    assert query(small_campaign, lost).to_pylist() == [{"case_id": 1, "lost_after": 2}]
    below = by_title["The first evaluation point where specificity falls below 0.5"]
    assert query(small_campaign, below).to_pylist() == [{"first_below": 2}]  # NS 0.25 at 2 edits
