"""A killed testbed build resumes from its checkpoint and ends with the same weights."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from seqedit.testbed.build import REPORT_FILE, PackedRows, TestbedConfig, build_testbed
from seqedit.testbed.checkpoint import CHECKPOINT_FILE
from seqedit.testbed.world import TestbedError, synthetic_world

CONFIG = TestbedConfig.tiny().model_copy(
    update={"steps": 12, "eval_every": 4, "target_recall": None}
)
WORLD = synthetic_world(20, 1)


class Killed(Exception):
    """Stands in for the process dying mid-training."""


def count_batches(monkeypatch: pytest.MonkeyPatch, kill_at: int | None = None) -> list[int]:
    """Count PackedRows.batch calls; raise Killed on call `kill_at`."""
    calls: list[int] = []
    real = PackedRows.batch

    def batch(self: PackedRows, size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        calls.append(size)
        if len(calls) == kill_at:
            raise Killed
        return real(self, size)

    monkeypatch.setattr(PackedRows, "batch", batch)
    return calls


def weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(out / "model.safetensors")


def test_a_killed_build_resumes_to_the_uninterrupted_weights(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    whole = build_testbed(tmp_path / "whole", WORLD, CONFIG, progress=False)
    assert not (tmp_path / "whole" / CHECKPOINT_FILE).exists()

    out = tmp_path / "killed"
    count_batches(monkeypatch, kill_at=10)  # dies in step 10: the step-8 state is saved
    with pytest.raises(Killed):
        build_testbed(out, WORLD, CONFIG, progress=False)
    assert (out / CHECKPOINT_FILE).is_file() and not (out / REPORT_FILE).exists()

    calls = count_batches(monkeypatch)
    resumed = build_testbed(out, WORLD, CONFIG, progress=False)
    assert len(calls) == 4  # steps 9-12 only
    assert not (out / CHECKPOINT_FILE).exists()
    a, b = weights(tmp_path / "whole"), weights(out)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [(p.step, p.loss, p.recall) for p in resumed.history] == [
        (p.step, p.loss, p.recall) for p in whole.history
    ]
    assert resumed.steps == whole.steps == 12 and resumed.final_loss == whole.final_loss


def test_a_checkpoint_of_another_build_is_not_resumed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "x"
    count_batches(monkeypatch, kill_at=6)
    with pytest.raises(Killed):
        build_testbed(out, WORLD, CONFIG, progress=False)
    calls = count_batches(monkeypatch)
    build_testbed(out, WORLD, CONFIG, seed=1, progress=False)  # another seed: from the start
    assert len(calls) == 12


def test_an_unreadable_checkpoint_is_named(tmp_path: Path) -> None:
    out = tmp_path / "x"
    out.mkdir()
    (out / CHECKPOINT_FILE).write_bytes(b"not a checkpoint")
    with pytest.raises(TestbedError, match=f"{CHECKPOINT_FILE}: unreadable training checkpoint"):
        build_testbed(out, WORLD, CONFIG, progress=False)
