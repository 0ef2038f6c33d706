"""Disk planning: `seqedit validate`'s estimate of a campaign's edit log, checkpoints and
tables, against what real testbed campaigns write."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoConfig, GPT2Config

from seqedit.methods.registry import METHODS
from seqedit.pipeline.cli.campaign_ops import plan_disk
from seqedit.pipeline.cli.disk_plan import (
    GB,
    estimate_disk,
    estimate_for_model_dir,
    safetensors_size,
)
from seqedit.pipeline.cli.main import main
from seqedit.pipeline.run.driver import run_campaign
from seqedit.schemas.campaign import load_spec
from tests.conftest import TINY_LAYER
from tests.pipeline.specs import write_spec

FT_M = {"layer": TINY_LAYER, "lr": 1e-2, "num_steps": 10}


def _files(folder: Path) -> int:
    """Bytes of the files under `folder` (what an object store would hold: no directories)."""
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def test_safetensors_size_is_the_file_size(tmp_path: Path) -> None:
    tensors = {
        "step7.m.left": torch.zeros(64, 3),
        "step7.m.right": torch.zeros(256, 3, dtype=torch.float64),
        "n_steps": torch.zeros(1, dtype=torch.int64),
    }
    metadata = {"campaign": "t", "editlog_version": "2"}
    save_file(tensors, tmp_path / "f.safetensors", metadata=metadata)
    meta = {name: t.to("meta") for name, t in tensors.items()}
    assert safetensors_size(meta, metadata) == (tmp_path / "f.safetensors").stat().st_size


def test_gpt2_xl_ft_m_is_estimated_on_the_meta_device(tmp_path: Path) -> None:
    config = GPT2Config(n_embd=1600, n_layer=48, n_head=25)
    spec = load_spec(write_spec(tmp_path, tmp_path, None, method="ft-m", n_edits=100,
                                shard_size=50, hparams={"layer": 17}))  # fmt: skip
    estimate = estimate_disk(spec, config)
    assert estimate is not None
    dense = 1600 * 6400 * 4  # one float32 dW of c_proj per step
    assert 100 * dense < estimate.edit_log < 100 * dense * 1.001
    assert 2 * dense < estimate.checkpoints < 2 * dense * 1.001  # two shards' masters
    assert estimate.total == estimate.edit_log + estimate.checkpoints + estimate.tables


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_method_is_estimated_without_weights(tmp_path: Path, name: str) -> None:
    method = METHODS[name]
    spec = load_spec(write_spec(tmp_path, tmp_path, None, method=name, n_edits=6, shard_size=3,
                                hparams=dict(method.quick_hparams)))  # fmt: skip
    small = estimate_disk(spec, GPT2Config(n_embd=64, n_layer=2, n_head=4))
    large = estimate_disk(spec, GPT2Config(n_embd=128, n_layer=2, n_head=4))
    assert small is not None and large is not None
    if name == "serac":  # its memory holds token ids, whatever the model's width
        assert 0 < small.edit_log == large.edit_log and 0 < small.checkpoints == large.checkpoints
        return
    assert 0 < small.edit_log < large.edit_log and 0 < small.checkpoints < large.checkpoints


def test_validate_prints_the_estimate_and_warns_over_budget(
    tiny_testbed: Path, tiny_stats: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    spec_file = write_spec(tmp_path, tiny_testbed, tiny_stats, n_edits=10)
    assert main(["validate", str(spec_file)]) == 0
    out = capsys.readouterr()
    assert "edit log" in out.out and "checkpoints" in out.out and "total" in out.out
    assert "warning" not in out.err
    assert main(["validate", str(spec_file), "--disk-budget", "1e-6"]) == 0
    assert "over the disk budget of 1e-06 GB" in capsys.readouterr().err
    spec = load_spec(write_spec(tmp_path, tiny_testbed, tiny_stats, n_edits=10,
                                disk_budget_gb=1e-6))  # fmt: skip
    estimate, warning = plan_disk(spec)
    assert estimate is not None and estimate.total > 1e-6 * GB and warning is not None


def test_no_estimate_without_a_model_config(tmp_path: Path) -> None:
    spec = load_spec(write_spec(tmp_path, tmp_path / "nowhere", None, n_edits=3))
    estimate, message = plan_disk(spec)
    assert estimate is None and message is not None and "config.json" in message


@pytest.mark.slow
@pytest.mark.parametrize(
    ("method", "hparams", "n_edits", "shard_size"),
    [
        ("rome", {"layer": TINY_LAYER, "context_templates": ["{}"]}, 20, 10),
        ("ft-m", FT_M, 10, 5),
    ],
)
def test_estimate_is_within_ten_percent_of_a_real_campaign(
    ray_local: None,
    tiny_testbed: Path,
    tiny_stats: Path,
    tmp_path: Path,
    method: str,
    hparams: dict[str, object],
    n_edits: int,
    shard_size: int,
) -> None:
    spec = load_spec(write_spec(tmp_path, tiny_testbed, tiny_stats, method=method,
                                hparams=hparams, n_edits=n_edits, shard_size=shard_size,
                                eval_every=shard_size))  # fmt: skip
    estimate = estimate_for_model_dir(spec)
    assert estimate is not None
    assert AutoConfig.from_pretrained(spec.model).model_type == "gpt2"
    assert run_campaign(spec, tmp_path / "c").status == "done"
    measured = {
        "edit log": _files(tmp_path / "c" / "editlog"),
        "checkpoints": _files(tmp_path / "c" / "checkpoints"),
        "tables": _files(tmp_path / "c" / "tables"),
    }
    measured["total"] = sum(measured.values())
    for what, size in estimate.rows():
        assert abs(size - measured[what]) <= 0.1 * measured[what], (what, size, measured)
