"""Build-or-reuse of what a testbed campaign needs: the synthetic testbed, its covariance
stats and held-out text. Shared by `make demo` and the benchmarks; a result is reused only
when it was made from the same inputs (source and seed; model and layers)."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from seqedit.files import write_text_atomic
from seqedit.methods.registry import METHODS
from seqedit.testbed.build import CORPUS_FILE, TestbedReport, build_synthetic_testbed, load_testbed
from seqedit.testbed.world import fact_statements, synthetic_world
from seqedit.workers.model_io import model_fingerprint
from seqedit.workers.stats import StatsConfig, compute_stats
from seqedit.workers.stats_store import load_accumulators, save_stats

Say = Callable[[str], None]

TESTBED_HPARAMS: dict[str, dict[str, Any]] = {
    name: copy.deepcopy(dict(method.testbed_hparams))
    for name, method in METHODS.items()
    if method.testbed_hparams
}
"""Method -> its hparams tuned on the synthetic-300 testbed (`EditMethod.testbed_hparams`,
docs/methods.md "Tuning on a small model"), for every registered method that has them. The
benchmarks use them; copy before changing one."""


def ensure_testbed(model_dir: Path, n_facts: int, seed: int, say: Say = print) -> TestbedReport:
    """The synthetic testbed of `n_facts` facts (seed `seed`) at `model_dir`: the one there
    if it was built from the same world, else a new one."""
    source = f"synthetic:{n_facts}:{seed}"
    try:
        report: TestbedReport | None = load_testbed(model_dir)[0]
    except (FileNotFoundError, ValueError):
        report = None
    if report is not None and report.source == source:
        say(f"reusing testbed {model_dir} ({report.n_facts} facts, recall {report.recall:.1%})")
        return report
    say(f"building testbed: {n_facts} synthetic facts, seed {seed}")
    report = build_synthetic_testbed(model_dir, n_facts, seed)
    say(f"top-1 recall {report.recall:.1%} in {report.train_seconds:.0f}s")
    return report


def ensure_stats(stats_dir: Path, model_dir: Path, layers: Sequence[int], say: Say = print) -> Path:
    """Covariance stats of `layers` of `model_dir` over its own corpus at `stats_dir`:
    reused when they cover those layers of that model (its weights, not only its path: a
    rebuilt testbed gets new stats), else computed (all `layers`)."""
    try:
        meta = load_accumulators(stats_dir).meta
        same_model = meta.model_fingerprint == model_fingerprint(model_dir)
        if set(layers) <= set(meta.layers) and same_model:
            say(f"reusing covariance {stats_dir} ({meta.token_count} tokens)")
            return stats_dir
    except (ValueError, FileNotFoundError):
        pass
    say(f"covariance of layers {list(layers)} over the testbed corpus")
    config = StatsConfig(layers=list(layers), corpus=[model_dir / CORPUS_FILE])
    save_stats(stats_dir, compute_stats(model_dir.resolve(), config, progress=True))
    return stats_dir


HELDOUT_SEED_OFFSET = 1000
"""The held-out world's seed is the testbed's plus this: other subjects, same language."""


def write_heldout(path: Path, seed: int, n_facts: int = 64) -> Path:
    """JSONL held-out text for the perplexity check: the statements of a synthetic world
    the testbed never saw (seed + HELDOUT_SEED_OFFSET), phrased like its training text."""
    world = synthetic_world(n_facts, seed + HELDOUT_SEED_OFFSET)
    lines = "".join(json.dumps({"text": t}) + "\n" for t in fact_statements(world))
    return write_text_atomic(path, lines)
