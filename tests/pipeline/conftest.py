"""Fixtures of the pipeline tests: local Ray for campaign tests, a small written campaign."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import ray

from seqedit.pipeline.campaign_dir.parts import write_part
from seqedit.pipeline.campaign_dir.state import CampaignState, ShardState
from seqedit.schemas.tables import EvalRow, HealthRow
from tests.pipeline.rows import edit_row


@pytest.fixture(scope="module")
def ray_local() -> Iterator[None]:
    """Two-CPU local Ray for the tests of one module."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    yield
    ray.shutdown()


def _eval(case_id: int, protocol: str, n: int, es: float) -> EvalRow:
    relation = "P17" if case_id == 0 else "P103"
    return EvalRow(campaign="c", protocol=protocol, n_edits_applied=n, case_id=case_id,
                   relation_id=relation, edit_step=case_id, metric_version="1", es=es, ps=0.5,
                   ns=es / 2, em=0.1, pm=0.1, nm=0.1, rewrite_acc=1.0, n_paraphrases=1,
                   n_neighbors=1)  # fmt: skip


def _check(step: int, name: str, value: float, passed: bool = True) -> HealthRow:
    action = "none" if passed else "record"
    return HealthRow(campaign="c", step=step, case_id=step, check_name=name, value=value,
                     threshold=None, passed=passed, action=action)  # fmt: skip


@pytest.fixture(scope="session")
def small_campaign(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """3 edits (case 1 later forgotten, case 2 rolled back), each scored right after its
    edit (immediate), retention at 2, final at 3."""
    root = tmp_path_factory.mktemp("cookbook")
    shard = ShardState(index=0, start=0, stop=3, status="done", done_attempt=0, steps_done=3)
    CampaignState(campaign="c", spec_hash="h", shards=[shard]).save(root)
    edits = [edit_row(0, 0), edit_row(1, 1), edit_row(2, 2, rolled_back=True, success=False)]
    evals = [
        _eval(0, "retention", 2, 1.0),
        _eval(1, "retention", 2, 0.0),
        _eval(0, "final", 3, 1.0),
        _eval(1, "final", 3, 0.0),
        _eval(2, "final", 3, 0.0),
        *(_eval(case, "immediate", case + 1, 1.0) for case in range(3)),  # right after each
    ]
    health = [_check(0, "verified", 1.0), _check(1, "verified", 1.0),
              _check(2, "verified", 0.0, passed=False), _check(1, "retention", 0.5),
              _check(1, "locality_kl", 0.2), _check(1, "weight_drift.m", 0.03)]  # fmt: skip
    for table, rows in (("edits", edits), ("evals", evals), ("health", health)):
        write_part(root, table, 0, 0, 0, rows)
    return root
