"""`seqedit report`: an HTML page with the summary table and the plots it names."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from seqedit.pipeline.cli import main
from seqedit.pipeline.report import campaign_summary


def test_summary_of_a_small_campaign(small_campaign: Path) -> None:
    summary = campaign_summary(small_campaign)
    assert summary["edits"] == 3 and summary["rolled_back"] == 1
    assert summary["immediate_es"] == 1.0  # the two kept edits succeeded
    assert summary["last_protocol"] == "final" and summary["last_es"] == pytest.approx(1 / 3)
    assert summary["failed_checks"] == 1


def test_report_page_shows_the_table_and_every_plot(
    small_campaign: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    other = tmp_path / "other"
    shutil.copytree(small_campaign, other)
    out = tmp_path / "report"
    assert main(["report", str(small_campaign), "--compare", str(other), "--out", str(out)]) == 0
    assert capsys.readouterr().out.strip() == f"report -> {out / 'index.html'}"
    page = (out / "index.html").read_text()
    images = re.findall(r'<img src="([^"]+)"', page)
    assert images == ["degradation.png", "degradation-health.png", "compare.png"]
    for name in images:
        assert (out / name).read_bytes()[:4] == b"\x89PNG"
    assert page.count("<tr><td>c</td>") == 2  # one row per campaign (both are named c)
    assert "<td>0.3333</td>" in page  # final ES of the small campaign
