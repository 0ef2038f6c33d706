"""The command line: query output formats, exit codes, clear one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from seqedit.pipeline.cli import main
from seqedit.pipeline.state import CampaignState, ShardState
from seqedit.pipeline.store import write_part
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
