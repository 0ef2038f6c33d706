"""Shared fixtures: a tiny fact testbed and its covariance, built once per test session."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from seqedit.testbed.build import CORPUS_FILE, TestbedConfig, build_synthetic_testbed
from seqedit.workers.stats import StatsConfig, compute_stats
from seqedit.workers.stats_store import save_stats

TINY_FACTS = 40
TINY_LAYER = 0


@pytest.fixture(scope="session")
def tiny_testbed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 4-layer GPT-2 trained on a 40-fact synthetic world (seed 0), as a model dir."""
    out = tmp_path_factory.mktemp("testbed") / "model"
    threads = torch.get_num_threads()
    try:
        build_synthetic_testbed(out, TINY_FACTS, 0, TestbedConfig.tiny(), progress=False)
    finally:
        torch.set_num_threads(threads)
    return out


@pytest.fixture(scope="session")
def tiny_stats(tiny_testbed: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Covariance of the tiny testbed's edited layer (0: where this narrow model edits best)."""
    out = tmp_path_factory.mktemp("stats")
    config = StatsConfig(layers=[TINY_LAYER], corpus=[tiny_testbed / CORPUS_FILE])
    save_stats(out, compute_stats(tiny_testbed, config, progress=False))
    return out
