"""`seqedit report`: an HTML page with the summary table and the plots it names."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from matplotlib.image import imread

from seqedit.pipeline.campaign_dir.parts import write_part
from seqedit.pipeline.campaign_dir.state import CampaignState, ShardState
from seqedit.pipeline.cli.main import main
from seqedit.pipeline.results.plot_data import EDIT_DRIFT_LAYER, layer_drift, update_norms
from seqedit.pipeline.results.report import campaign_summary
from tests.pipeline.rows import edit_row


def test_summary_of_a_small_campaign(small_campaign: Path) -> None:
    summary = campaign_summary(small_campaign)
    assert summary["edits"] == 3 and summary["rolled_back"] == 1
    assert summary["immediate_es"] == 1.0  # the two kept edits succeeded
    assert summary["last_protocol"] == "final" and summary["last_es"] == pytest.approx(1 / 3)
    assert summary["failed_checks"] == 1


def _assert_drawn_png(path: Path) -> None:
    """A PNG that decodes to a figure-sized image with more than a few colours."""
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    pixels = imread(path)
    height, width = pixels.shape[:2]
    assert width >= 800 and height >= 450, (path.name, pixels.shape)
    colours = np.unique(pixels.reshape(-1, pixels.shape[2]), axis=0)
    assert len(colours) > 50, path.name  # axes, text, lines: not a blank canvas


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
    assert images == [
        "degradation.png",
        "degradation-health.png",
        "degradation-norm-growth.png",
        "compare.png",
        "compare-norm-growth.png",
    ]
    for name in images:
        _assert_drawn_png(out / name)
    captions = re.findall(r"<figcaption>([^<]+)</figcaption>", page)
    assert len(captions) == len(images) and all(len(c) > 40 for c in captions)
    assert "update norm of each edit" in captions[2]
    assert page.count("<tr><td>c</td>") == 2  # one row per campaign (both are named c)
    assert "<td>0.3333</td>" in page  # final ES of the small campaign


def test_norm_growth_series_of_the_small_campaign(small_campaign: Path) -> None:
    """One periodic drift check (module m, after the edit of step 1 = 2 edits applied)."""
    assert layer_drift(small_campaign).to_pylist() == [{"layer": "m", "n": 2, "drift": 0.03}]
    norms = update_norms(small_campaign).to_pylist()
    assert [(r["n"], r["rolled_back"], r["rolling_median"]) for r in norms] == [
        (1, False, 1.0),
        (2, False, 1.0),
        (3, True, None),  # rolled back: drawn as a cross, outside the median
    ]


@pytest.fixture
def drift_free_campaign(tmp_path: Path) -> Path:
    """4 edits, the third rolled back, no periodic checks: norms 1, 3, 100, 2."""
    shard = ShardState(index=0, start=0, stop=4, status="done", done_attempt=0, steps_done=4)
    CampaignState(campaign="c", spec_hash="h", shards=[shard]).save(tmp_path)
    edits = [
        edit_row(0, 0, update_norm=1.0, weight_drift=0.1),
        edit_row(1, 1, update_norm=3.0, weight_drift=0.2),
        edit_row(2, 2, update_norm=100.0, weight_drift=5.0, rolled_back=True),
        edit_row(3, 3, update_norm=2.0, weight_drift=0.3),
    ]
    write_part(tmp_path, "edits", 0, 0, 0, edits)
    return tmp_path


def test_rolling_median_of_update_norms_skips_rolled_back_edits(
    drift_free_campaign: Path,
) -> None:
    norms = update_norms(drift_free_campaign, window=3).to_pylist()
    assert [r["update_norm"] for r in norms] == [1.0, 3.0, 100.0, 2.0]
    # windows of 3 rows: {1}, {1, 3}, -, {3, (100 rolled back), 2}
    assert [r["rolling_median"] for r in norms] == [1.0, 2.0, None, 2.5]


def test_drift_falls_back_to_the_edit_rows_without_periodic_checks(
    drift_free_campaign: Path, tmp_path: Path
) -> None:
    assert layer_drift(drift_free_campaign).to_pylist() == [
        {"layer": EDIT_DRIFT_LAYER, "n": 1, "drift": 0.1},
        {"layer": EDIT_DRIFT_LAYER, "n": 2, "drift": 0.2},
        {"layer": EDIT_DRIFT_LAYER, "n": 4, "drift": 0.3},  # the rolled-back edit is gone
    ]
    assert main(["plot", str(drift_free_campaign), "--out", str(tmp_path / "p.png")]) == 0
    _assert_drawn_png(tmp_path / "p-norm-growth.png")  # no evaluations: no p.png
    assert not (tmp_path / "p.png").exists()
