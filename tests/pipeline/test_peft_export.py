"""`seqedit export --format peft`: peft loads the adapter on the base model and gives the
rebuilt model's logits; `unload()` gives the base model's back; past the rank asked, the
SVD error is reported; dense and memory edits are refused with the reason."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import ray
import torch
from peft import PeftModel

from seqedit.methods.updates import DenseDelta, LowRankDelta, MemoryEntry
from seqedit.pipeline.cli.campaign_ops import rebuild_model
from seqedit.pipeline.cli.main import main
from seqedit.pipeline.cli.peft_export import (
    ExportError,
    Factors,
    export_peft,
    fitted,
    refuse_non_low_rank,
)
from seqedit.pipeline.run.driver import run_campaign
from seqedit.schemas.campaign import load_spec
from seqedit.workers.model_io import load_model
from tests.pipeline.specs import write_spec

PROMPTS = ["The capital of", "A river in the north", "Her first language is"]


def logits(model: torch.nn.Module, tokenizer) -> torch.Tensor:
    """(3, T, V) logits of PROMPTS (padded on the right; padding never compared)."""
    batch = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        return model(**batch).logits.masked_fill(~batch.attention_mask.bool()[..., None], 0)


def campaign(tmp_path: Path, testbed: Path, stats: Path | None, **fields: object) -> Path:
    spec = write_spec(tmp_path, testbed, stats, **fields)
    try:
        state = run_campaign(load_spec(spec), tmp_path / "c")
    finally:
        ray.shutdown()
    assert state.status == "done"
    return tmp_path / "c"


def round_trip(campaign_dir: Path, base_dir: Path, tmp_path: Path, step: int) -> None:
    """Export at `step`: peft's model = the rebuilt one (1e-5); unloaded = the base."""
    rebuild_model(campaign_dir, step, tmp_path / "rebuilt")
    rebuilt, tokenizer = load_model(tmp_path / "rebuilt")
    expected = logits(rebuilt, tokenizer)
    base, _ = load_model(base_dir)
    before = logits(base, tokenizer)
    command = ["export", str(campaign_dir), "--step", str(step), "--out", str(tmp_path / "a")]
    assert main(command) == 0
    report = json.loads((tmp_path / "a" / "seqedit_export.json").read_text())
    assert report["exact"] and report["max_relative_error"] == 0.0
    adapted = PeftModel.from_pretrained(base, str(tmp_path / "a")).eval()
    # the adapter's merged weights against the rebuilt ones: to float32 rounding (logits of
    # about 8 carry a few ulps, ~1e-6 relative, of a different summation order)
    torch.testing.assert_close(logits(adapted, tokenizer), expected, atol=1e-5, rtol=1e-5)
    assert (expected - before).abs().max() > 1e-3  # the edits moved the logits
    unloaded = adapted.unload()
    torch.testing.assert_close(logits(unloaded, tokenizer), before, atol=0, rtol=0)


@pytest.mark.slow
def test_a_rome_campaign_round_trips_through_peft(
    tiny_testbed: Path, tiny_stats: Path, tmp_path: Path
) -> None:
    campaign_dir = campaign(tmp_path, tiny_testbed, tiny_stats, n_edits=4, shard_size=2)
    round_trip(campaign_dir, tiny_testbed, tmp_path, 3)
    truncated = export_peft(campaign_dir, 3, tmp_path / "r1", rank=1)
    assert not truncated.exact and truncated.r == 1
    assert 0 < truncated.max_relative_error < 1
    assert truncated.modules[0].stacked_rank == 4


@pytest.mark.slow
def test_a_continued_lora_campaign_exports_the_adapter_itself(
    tiny_testbed: Path, tmp_path: Path
) -> None:
    hparams = {"layers": [0, 2], "num_steps": 5, "lr": 1e-2, "lora_dropout": 0.0, "rank": 2}
    campaign_dir = campaign(
        tmp_path, tiny_testbed, None, method="lora", hparams=hparams, n_edits=3, shard_size=2
    )
    round_trip(campaign_dir, tiny_testbed, tmp_path, 2)
    report = json.loads((tmp_path / "a" / "seqedit_export.json").read_text())
    assert report["r"] == 2  # s B_3 A_3, not the 2r columns of every step side by side
    assert len(report["modules"]) == 2


def test_svd_past_the_rank_reports_its_error() -> None:
    torch.manual_seed(0)
    left, right = torch.randn(12, 6, dtype=torch.float64), torch.randn(10, 6, dtype=torch.float64)
    full = left @ right.T
    exact, report = fitted("m", Factors(left, right), None)
    assert report.rank == 6 and report.relative_error == 0.0 and exact.left is left
    cut, report = fitted("m", Factors(left, right), 3)
    u, s, vh = torch.linalg.svd(full)
    best = (u[:, :3] * s[:3]) @ vh[:3]
    torch.testing.assert_close(cut.left @ cut.right.T, best)
    error = float((full - best).norm() / full.norm())
    assert report.rank == 3 and report.relative_error == pytest.approx(error)
    wide = Factors(torch.randn(4, 9, dtype=torch.float64), torch.randn(5, 9, dtype=torch.float64))
    compressed, report = fitted("m", wide, None)
    assert report.rank == 4 and report.relative_error < 1e-6  # past full rank: compressed
    torch.testing.assert_close(compressed.left @ compressed.right.T, wide.left @ wide.right.T)


def test_dense_and_memory_edits_are_refused() -> None:
    low = LowRankDelta("m", torch.zeros(3, 1), torch.zeros(2, 1))
    refuse_non_low_rank("rome", [[low], []])
    with pytest.raises(ExportError, match=r"ft-m logs dense weight changes \(step 1, m\)"):
        refuse_non_low_rank("ft-m", [[], [DenseDelta("m", torch.zeros(3, 2))]])
    entry = MemoryEntry(tensors={"rows": torch.zeros(1)}, info={"action": "add"})
    with pytest.raises(ExportError, match="grace edits through a memory"):
        refuse_non_low_rank("grace", [[entry]])
