"""The command line: query output formats, exit codes, clear one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from seqedit.pipeline.campaign_dir.parts import write_part
from seqedit.pipeline.campaign_dir.state import CampaignState, ShardState
from seqedit.pipeline.cli.commands import HEALTH_PER_EDIT_SQL, HEALTH_PERIODIC_SQL
from seqedit.pipeline.cli.main import main
from seqedit.pipeline.results.views import query
from seqedit.schemas.tables import HealthRow
from tests.pipeline.rows import edit_row


@pytest.fixture()
def campaign(tmp_path: Path) -> Path:
    shard = ShardState(index=0, start=0, stop=3, status="done", done_attempt=0)
    CampaignState(campaign="c", spec_hash="h", shards=[shard]).save(tmp_path)
    rows = [edit_row(i, 100 + i, weight_drift=0.01 * (i + 1)) for i in range(3)]
    write_part(tmp_path, "edits", 0, 0, 0, rows)
    return tmp_path


def test_query_json(campaign: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(
        ["query", str(campaign), "SELECT case_id FROM edits ORDER BY step", "--format", "json"]
    )
    assert code == 0
    assert json.loads(capsys.readouterr().out) == [
        {"case_id": 100},
        {"case_id": 101},
        {"case_id": 102},
    ]


def test_query_table(campaign: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["query", str(campaign), "SELECT count(*) AS n FROM edits"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].strip() == "n" and "3" in out and "(1 row)" in out


def test_query_refuses_delete_with_exit_2(
    campaign: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["query", str(campaign), "DELETE FROM edits"]) == 2
    err = capsys.readouterr().err
    assert "DELETE statements are not allowed" in err and err.count("\n") == 1


def test_query_on_a_folder_that_is_no_campaign(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["query", str(tmp_path), "SELECT 1"]) == 2
    assert "no campaign state here" in capsys.readouterr().err


def test_bad_sql_names_the_problem(campaign: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["query", str(campaign), "SELECT nope FROM edits"]) == 2
    assert "nope" in capsys.readouterr().err


def test_query_with_another_campaign(
    campaign: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    other = tmp_path / "other"
    shard = ShardState(index=0, start=0, stop=1, status="done", done_attempt=0)
    CampaignState(campaign="o", spec_hash="h", shards=[shard]).save(other)
    write_part(other, "edits", 0, 0, 0, [edit_row(0, 7)])
    sql = "SELECT e.step, e.case_id, o.case_id AS b_case FROM edits e JOIN b.edits o USING (step)"
    code = main(["query", str(campaign), sql, "--with", f"b={other}", "--format", "json"])
    assert code == 0
    assert json.loads(capsys.readouterr().out) == [{"step": 0, "case_id": 100, "b_case": 7}]
    code = main(["query", str(campaign), "DELETE FROM b.edits", "--with", f"b={other}"])
    assert code == 2 and "DELETE statements are not allowed" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("with_", "error"),
    [("curves={}", "'curves' is a view name"), ("2b={}", "letters, digits"),
     ("b={}/missing", "campaign 'b': "), ("b={}/tables", "no campaign state here")],
)  # fmt: skip
def test_query_with_a_bad_other_campaign_is_one_clear_line(
    campaign: Path, capsys: pytest.CaptureFixture[str], with_: str, error: str
) -> None:
    assert main(["query", str(campaign), "SELECT 1", "--with", with_.format(campaign)]) == 2
    err = capsys.readouterr().err
    assert error in err and err.count("\n") == 1


def test_query_with_needs_name_equals_dir(
    campaign: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["query", str(campaign), "SELECT 1", "--with", str(campaign)])
    assert exit_info.value.code == 2 and "expected NAME=DIR" in capsys.readouterr().err
    code = main(["query", str(campaign), "SELECT 1", "--with", f"b={campaign}",
                 "--with", f"b={campaign}"])  # fmt: skip
    assert code == 2 and "given twice" in capsys.readouterr().err


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.startswith("seqedit ")


def test_testbed_of_an_unknown_architecture_lists_the_known_ones(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "tb"
    code = main(
        ["testbed", "build", "--out", str(out), "--synthetic", "5", "--architecture", "falcon"]
    )
    assert code == 2
    err = capsys.readouterr().err
    assert "architecture" in err and "'llama'" in err and "'qwen2'" in err
    assert not out.exists()


def test_plot_writes_the_health_panels_from_edits_and_periodic_checks(
    campaign: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """No evaluation rows yet: no degradation curve, but the health plot of what ran."""
    periodic = [
        HealthRow(campaign="c", step=2, case_id=102, check_name=name, value=value,
                  threshold=None, passed=True, action="none")
        for name, value in (("retention", 1.0), ("locality_kl", 0.2),
                            ("perplexity_ratio", 1.1), ("weight_drift.m", 0.03))
    ]  # fmt: skip
    write_part(campaign, "health", 0, 0, 0, periodic)
    assert main(["plot", str(campaign)]) == 0
    written = [campaign / "health.png", campaign / "norm-growth.png"]
    assert capsys.readouterr().out.split("\n")[:-1] == [f"plot -> {p}" for p in written]
    for png in written:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    per_edit = query(campaign, HEALTH_PER_EDIT_SQL.format(window=49)).to_pylist()
    assert [r["n"] for r in per_edit] == [1, 2, 3]
    assert query(campaign, HEALTH_PERIODIC_SQL).to_pylist() == [
        {"n": 3, "retention": 1.0, "locality_top1": None, "locality_kl": 0.2,
         "perplexity_ratio": 1.1, "weight_drift": 0.03}
    ]  # fmt: skip


def test_plot_of_a_campaign_without_finished_shards(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    shard = ShardState(index=0, start=0, stop=3, status="running")
    CampaignState(campaign="c", spec_hash="h", shards=[shard]).save(tmp_path)
    assert main(["plot", str(tmp_path)]) == 2
    assert "no finished shard yet" in capsys.readouterr().err
