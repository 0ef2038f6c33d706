"""ensure_stats reuses a covariance only for the very model it was computed on."""

from __future__ import annotations

import shutil
from pathlib import Path

from safetensors.torch import load_file, save_file

from seqedit.pipeline.cli.prepared import ensure_stats
from seqedit.workers.stats_store import load_accumulators


def test_a_model_rebuilt_at_the_same_path_gets_new_stats(
    tiny_testbed: Path, tmp_path: Path
) -> None:
    model = tmp_path / "model"
    shutil.copytree(tiny_testbed, model)
    said: list[str] = []
    ensure_stats(tmp_path / "stats", model, [0], say=said.append)
    ensure_stats(tmp_path / "stats", model, [0], say=said.append)
    assert said[1].startswith("reusing covariance")
    first = load_accumulators(tmp_path / "stats").meta.model_fingerprint

    weights = model / "model.safetensors"
    tensors = load_file(weights)
    tensors = {name: t + 0.01 if t.is_floating_point() else t for name, t in tensors.items()}
    save_file(tensors, weights, metadata={"format": "pt"})
    ensure_stats(tmp_path / "stats", model, [0], say=said.append)
    assert said[2].startswith("covariance of layers [0]")
    assert load_accumulators(tmp_path / "stats").meta.model_fingerprint != first
