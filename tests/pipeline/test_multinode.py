"""A campaign on a Ray cluster of a head and 2 worker nodes started here, its directory and
stats on S3 (a local moto server, the storage every node reaches): its covariance shards
and evaluation tasks run on both workers, and its rows equal a one-node run's."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import ray
from ray.cluster_utils import Cluster

from seqedit.pipeline.results.views import query
from seqedit.pipeline.run.driver import run_campaign
from seqedit.pipeline.run.stats_job import build_stats_sharded
from seqedit.schemas.campaign import load_spec
from seqedit.storage import Location, location
from seqedit.testbed.build import CORPUS_FILE
from seqedit.workers.stats import StatsConfig
from seqedit.workers.stats_store import load_accumulators
from tests.pipeline.specs import write_spec
from tests.pipeline.test_campaign_integration import assert_same_rows

EVALUATION = {"actors": 2, "chunk": 3, "immediate": True,
              "resources": {"num_cpus": 0.5, "torch_threads": 1}}  # fmt: skip


def _spec(folder: Path, testbed: Path, stats: str) -> Path:
    folder.mkdir()
    build = {"corpus": [str(testbed / CORPUS_FILE)], "shards": 4, "actors": 2}
    return write_spec(folder, testbed, stats, name="multi", n_edits=6,  # type: ignore[arg-type]
                      shard_size=3, eval_every=3, stats_build=build, evaluation=EVALUATION,
                      hparams={"layer": 0, "context_templates": ["{}"]})  # fmt: skip


@contextmanager
def two_worker_cluster() -> Iterator[Cluster]:
    """A head that runs only the driver, and two worker nodes of 2 CPUs; the driver is
    connected to it."""
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    try:
        for _ in range(2):
            cluster.add_node(num_cpus=2)
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, log_to_driver=False, logging_level="ERROR")
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()


@pytest.mark.extended  # in CI, test_submit runs campaigns with their actors on a cluster;
# this adds several nodes and the equality of rows across layouts (make test-extended)
def test_a_campaign_on_two_worker_nodes_equals_a_one_node_run(
    tiny_testbed: Path, tmp_path: Path, s3_root: str
) -> None:
    local = load_spec(_spec(tmp_path / "local", tiny_testbed, str(tmp_path / "local" / "stats")))
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    try:
        assert run_campaign(local, tmp_path / "local" / "c").status == "done"
    finally:
        ray.shutdown()
    with two_worker_cluster():
        _run_on_the_cluster(tiny_testbed, tmp_path, location(s3_root))


def _run_on_the_cluster(tiny_testbed: Path, tmp_path: Path, s3: Location) -> None:
    workers = {n["NodeID"] for n in ray.nodes() if n["Alive"] and n["Resources"].get("CPU")}
    assert len(workers) == 2
    remote = load_spec(_spec(tmp_path / "remote", tiny_testbed, str(s3 / "stats")))
    assert run_campaign(remote, s3 / "c").status == "done"
    assert_same_rows(s3 / "c", tmp_path / "local" / "c")  # type: ignore[arg-type]
    assert not (tmp_path / "remote" / "stats").exists()  # stats and campaign: on S3 only

    evals = query(s3 / "c", "SELECT DISTINCT node FROM evals").to_pylist()
    assert {r["node"] for r in evals} == workers  # evaluation tasks ran on both workers
    edits = query(s3 / "c", "SELECT DISTINCT node FROM edits").to_pylist()
    assert len(edits) == 1 and edits[0]["node"] in workers
    local_stats = load_accumulators(tmp_path / "local" / "stats")
    remote_stats = load_accumulators(s3 / "stats")
    for layer, accumulator in local_stats.accumulators.items():
        assert remote_stats.accumulators[layer].sum.equal(accumulator.sum)

    # the covariance shards themselves, on both workers
    config = StatsConfig(layers=[0, 1], corpus=[tiny_testbed / CORPUS_FILE])
    _, report = build_stats_sharded(tiny_testbed, config, s3 / "s", shards=4, actors=2,
                                    progress=False)  # fmt: skip
    assert set(report.nodes) == {0, 1, 2, 3} and set(report.nodes.values()) == workers
