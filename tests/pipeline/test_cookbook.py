"""Every query of docs/sql-cookbook.md runs on a small campaign and answers what it says."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from seqedit.methods.metrics import score
from seqedit.pipeline.campaign_dir.parts import write_part
from seqedit.pipeline.campaign_dir.state import CampaignState, ShardState
from seqedit.pipeline.results.views import query
from seqedit.schemas.tables import EvalRow

COOKBOOK = Path(__file__).resolve().parents[2] / "docs" / "sql-cookbook.md"
QUERIES = re.findall(r"```sql\n(.*?)```", COOKBOOK.read_text(encoding="utf-8"), re.DOTALL)


def _eval(case_id: int, protocol: str, n: int, es: float, ns: float) -> EvalRow:
    return EvalRow(campaign="b", protocol=protocol, n_edits_applied=n, case_id=case_id,
                   edit_step=case_id, metric_version="1", es=es, ps=1.0, ns=ns, em=0.1,
                   pm=0.1, nm=0.1, rewrite_acc=1.0, n_paraphrases=1,
                   n_neighbors=1)  # fmt: skip


@pytest.fixture(scope="module")
def other_campaign(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A second campaign, `b` in the queries: the same evaluation points as the small
    campaign plus one it lacks (at 1 edit), with other metrics."""
    root = tmp_path_factory.mktemp("other")
    shard = ShardState(index=0, start=0, stop=3, status="done", done_attempt=0, steps_done=3)
    CampaignState(campaign="b", spec_hash="h2", shards=[shard]).save(root)
    evals = [
        _eval(0, "retention", 1, 1.0, 1.0),
        _eval(0, "retention", 2, 1.0, 1.0),
        _eval(1, "retention", 2, 1.0, 0.5),
        _eval(0, "final", 3, 1.0, 0.5),
        _eval(1, "final", 3, 1.0, 0.5),
        _eval(2, "final", 3, 0.0, 0.5),
    ]
    write_part(root, "evals", 0, 0, 0, evals)
    return root


def test_the_cookbook_has_its_queries() -> None:
    assert len(QUERIES) >= 10


@pytest.mark.parametrize("sql", QUERIES, ids=lambda q: q.split("\n")[0][:40])
def test_every_cookbook_query_runs_and_finds_rows(
    small_campaign: Path, other_campaign: Path, sql: str
) -> None:
    assert query(small_campaign, sql, others={"b": other_campaign}).num_rows >= 1


def test_the_answers_are_right(small_campaign: Path, other_campaign: Path) -> None:
    by_title = dict(zip(re.findall(r"^## (.+)$", COOKBOOK.read_text(), re.MULTILINE), QUERIES,
                        strict=True))  # fmt: skip
    forgotten = by_title["Edits that worked when made, then were forgotten by the end"]
    assert [r["case_id"] for r in query(small_campaign, forgotten).to_pylist()] == [1]
    lost = by_title["When each edit was lost: the first retention point that no longer holds it"]
    assert query(small_campaign, lost).to_pylist() == [{"case_id": 1, "lost_after": 2}]
    below = by_title["The first evaluation point where specificity falls below 0.5"]
    assert query(small_campaign, below).to_pylist() == [{"first_below": 2}]  # NS 0.25 at 2 edits
    worst = query(small_campaign, by_title["The worst relations by the end"]).to_pylist()
    found = [(r["relation_id"], r["records"], r["es"]) for r in worst]
    assert found == [("P103", 2, 0.0), ("P17", 1, 1.0)]
    gap = by_title["The protocol gap: each edit right after it was made, and after all edits"]
    assert query(small_campaign, gap).to_pylist() == [
        {"records": 3, "immediate_es": 1.0, "final_es": 0.333, "immediate_ns": 0.5,
         "final_ns": round(1 / 6, 3)}]  # fmt: skip
    compare = query(small_campaign, by_title["Compare two campaigns"], {"b": other_campaign})
    assert compare.column_names == [
        "protocol", "n_edits_applied", "score", "b_score", "ns", "b_ns", "score_gain"
    ]  # fmt: skip
    mine = [score(0.5, 0.5, 0.25), score(1 / 3, 0.5, 1 / 6)]  # see conftest.small_campaign
    theirs = [score(1.0, 1.0, 0.75), score(2 / 3, 1.0, 0.5)]
    assert compare.to_pylist() == [  # the point at 1 edit only b has is not shared: no row
        {"protocol": "retention", "n_edits_applied": 2, "score": round(mine[0], 3),
         "b_score": round(theirs[0], 3), "ns": 0.25, "b_ns": 0.75,
         "score_gain": round(mine[0] - theirs[0], 3)},
        {"protocol": "final", "n_edits_applied": 3, "score": round(mine[1], 3),
         "b_score": round(theirs[1], 3), "ns": round(1 / 6, 3), "b_ns": 0.5,
         "score_gain": round(mine[1] - theirs[1], 3)},
    ]  # fmt: skip
