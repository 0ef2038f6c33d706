"""GPU placement without GPUs: Ray with declared (fake) GPUs hands out GPU ids, so the
options the driver gives the editor and the evaluators can be checked for separate GPUs,
and a campaign asking for more GPUs than the cluster has is refused before it starts."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import ray

from seqedit.pipeline.run.actors import actor_options, device_for, spread_options
from seqedit.pipeline.run.driver import _check_resources
from seqedit.schemas.campaign import CampaignSpec, load_spec
from tests.pipeline.specs import write_spec


@pytest.fixture(scope="module")
def three_fake_gpus() -> Iterator[None]:
    ray.init(num_cpus=2, num_gpus=3, include_dashboard=False, log_to_driver=False,
             logging_level="ERROR")  # fmt: skip
    yield
    ray.shutdown()


class Probe:
    """Stands in for an actor: reports the GPUs Ray gave it (no CUDA is touched)."""

    def gpus(self) -> tuple[list[str], str]:
        return [str(i) for i in ray.get_gpu_ids()], os.environ.get("CUDA_VISIBLE_DEVICES", "")


ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import tests


def _spec(tmp_path: Path, testbed: Path, evaluators: int) -> CampaignSpec:
    evaluation = {"actors": evaluators, "resources": {"num_cpus": 0.25, "num_gpus": 1}}
    return load_spec(write_spec(tmp_path, testbed, None, method="ft-m", n_edits=2,
                                evaluation=evaluation,
                                resources={"num_cpus": 0.25, "num_gpus": 1}))  # fmt: skip


def test_the_editor_and_each_evaluator_get_a_gpu_of_their_own(
    three_fake_gpus: None, tiny_testbed: Path, tmp_path: Path
) -> None:
    spec = _spec(tmp_path, tiny_testbed, evaluators=2)
    _check_resources(spec)  # 3 GPUs asked for, 3 there
    assert device_for(spec.resources) == device_for(spec.evaluation.resources) == "cuda"
    editor = ray.remote(Probe).options(**actor_options(spec.resources)).remote()
    evaluators = [
        ray.remote(Probe).options(**spread_options(spec.evaluation.resources)).remote()
        for _ in range(spec.evaluation.actors)
    ]
    placed = ray.get([actor.gpus.remote() for actor in (editor, *evaluators)])
    ids = [tuple(gpus) for gpus, _ in placed]
    assert all(len(gpus) == 1 for gpus in ids) and len(set(ids)) == 3  # no GPU shared
    assert [visible for _, visible in placed] == [gpus[0] for gpus in ids]  # what CUDA sees


def test_more_gpus_than_the_cluster_has_is_refused_before_anything_starts(
    three_fake_gpus: None, tiny_testbed: Path, tmp_path: Path
) -> None:
    spec = _spec(tmp_path, tiny_testbed, evaluators=3)
    with pytest.raises(ValueError, match=r"need 4 GPU, the cluster has 3"):
        _check_resources(spec)
