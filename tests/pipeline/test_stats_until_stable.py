"""`stats build --until-stable`: the stop is the first stable prefix of shards whatever
order they finish in, the stats are exactly that prefix's sum, a rerun resumes from the
partials to the same stop, and campaigns build and check such stats."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from seqedit.pipeline.cli.main import main
from seqedit.pipeline.run.driver import run_campaign
from seqedit.pipeline.run.stats_job import build_stats_sharded, shard_path, shuffled_runs
from seqedit.pipeline.run.stats_until_stable import StabilityMonitor, StableReached, UntilStable
from seqedit.schemas.campaign import load_spec
from seqedit.schemas.loaders import load_requests
from seqedit.testbed.build import CORPUS_FILE
from seqedit.workers.covariance_worker import CovarianceWorker, ShardSums
from seqedit.workers.stats import StatsConfig, StatsStoreError, selected_documents
from seqedit.workers.stats_store import load_accumulators
from tests.pipeline.specs import write_spec

LAYERS = [0, 1]


def _synthetic_shards(n: int, d: int = 6, size: int = 300) -> list[ShardSums]:
    """`n` shards of keys from one Gaussian: their estimates settle as shards add up."""
    mix = torch.randn(d, d, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    parts = []
    for index in range(n):
        noise = torch.randn(size, d, generator=torch.Generator().manual_seed(index + 1))
        keys = noise.double() @ mix
        parts.append(ShardSums(index=index, sums={3: keys.T @ keys}, counts={3: size},
                               tokens=size, documents=1, seconds=0.0))  # fmt: skip
    return parts


def _rule(eps: float) -> UntilStable:
    return UntilStable(eps=eps, prompts=["{} a"], subjects=["x"], nullspace_threshold=0.5)


def _feed(monitor: StabilityMonitor, parts: list[ShardSums]) -> int | None:
    for part in parts:
        try:
            monitor.add(part)
        except StableReached as stop:
            return stop.chunks
    return None


def test_the_stop_is_the_first_stable_prefix_in_any_finishing_order() -> None:
    parts = _synthetic_shards(12)
    keys = {3: torch.randn(4, 6, generator=torch.Generator().manual_seed(9))}
    never = StabilityMonitor(_rule(1e-12), keys, len(parts))
    assert _feed(never, parts) is None
    changes = [entry["max_change"] for entry in never.evidence]
    assert changes[0] is None and len(changes) == 12  # the first prefix has nothing to match
    assert never.record()["stable"] is False and never.record()["shards_used"] == 12
    eps = min(changes[3:9]) * 1.0001
    expected = next(i + 1 for i, change in enumerate(changes) if change and change < eps)
    assert expected < 12
    in_order = StabilityMonitor(_rule(eps), keys, len(parts))
    assert _feed(in_order, parts) == expected
    shuffled = [parts[i] for i in torch.randperm(12, generator=torch.Generator().manual_seed(3))]
    any_order = StabilityMonitor(_rule(eps), keys, len(parts))
    assert _feed(any_order, shuffled) == expected
    assert any_order.evidence == in_order.evidence
    for entry in in_order.evidence:  # P k (an eigendecomposition) once C^-1 k settled
        settled = entry["changes"]["inverse_keys.3"] is not None and \
            entry["changes"]["inverse_keys.3"] < eps  # fmt: skip
        assert ("projected_keys.3" in entry["changes"]) == settled
    record = in_order.record()
    assert record["shards_used"] == expected and record["final_change"] < eps
    assert record["tokens_used"] == 300 * expected


def test_shuffled_runs_cover_every_document_once_in_sorted_runs() -> None:
    runs = shuffled_runs(range(20), 3, seed=0)
    assert sorted(d for run in runs for d in run) == list(range(20))
    assert all(list(run) == sorted(run) for run in runs)
    assert runs != [list(r) for r in (range(0, 7), range(7, 14), range(14, 20))]


def _config(testbed: Path) -> StatsConfig:
    return StatsConfig(layers=LAYERS, corpus=[testbed / CORPUS_FILE], batch_size=8,
                       dtype="float64")  # fmt: skip


@pytest.mark.slow
def test_until_stable_job_stops_sums_its_prefix_and_resumes(
    ray_local: None, tiny_testbed: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = _config(tiny_testbed)
    requests = load_requests(tiny_testbed / "requests.jsonl").requests
    never = UntilStable.of_requests(1e-12, requests, 8, None)
    full, report = build_stats_sharded(tiny_testbed, config, tmp_path / "full", shards=8,
                                       actors=1, progress=False, until_stable=never)  # fmt: skip
    assert report.shards_used == 8 and full.meta.until_stable["stable"] is False
    changes = [entry["max_change"] for entry in full.meta.until_stable["history"]]
    eps = min(changes[2:7]) * 1.0001
    expected = next(i + 1 for i, change in enumerate(changes) if change and change < eps)

    args = ["stats", "build", "--model", str(tiny_testbed), "--layers", "0,1", "--corpus",
            str(tiny_testbed / CORPUS_FILE), "--batch-size", "8", "--shards", "8",
            "--actors", "1", "--quiet", "--probes", "8",
            "--probe-requests", str(tiny_testbed / "requests.jsonl")]  # fmt: skip
    out = tmp_path / "stable"
    assert main([*args, "--out", str(out), "--until-stable", repr(eps)]) == 0
    printed = capsys.readouterr().out
    assert f"stable after {expected} of 8 shards" in printed
    stable = load_accumulators(out)
    assert stable.meta.until_stable["shards_used"] == expected
    assert sum(shard_path(out, i).is_file() for i in range(8)) == expected  # no more computed

    # exactly the sum of the first `expected` shards of the seeded order, in shard order
    runs = shuffled_runs(selected_documents(config), 8, config.seed)
    worker = CovarianceWorker(tiny_testbed, config)
    parts = [worker.run_shard(i, runs[i]) for i in range(expected)]
    for layer in LAYERS:
        total = parts[0].sums[layer].clone()
        for part in parts[1:]:
            total += part.sums[layer]
        assert torch.equal(stable.accumulators[layer].sum, total)
        assert stable.accumulators[layer].count == sum(p.counts[layer] for p in parts)

    _, again = build_stats_sharded(tiny_testbed, config, out, shards=8, actors=1,
                                   progress=False,
                                   until_stable=UntilStable.of_requests(
                                       eps, requests, 8, None))  # fmt: skip
    assert (again.computed, again.reused, again.shards_used) == (0, expected, expected)
    resumed = load_accumulators(out)
    for layer in LAYERS:
        assert torch.equal(resumed.accumulators[layer].sum, stable.accumulators[layer].sum)

    assert main([*args, "--out", str(tmp_path / "x"), "--until-stable", "0.1",
                 "--shards", "1"]) == 2  # fmt: skip
    assert "--shards N > 1" in capsys.readouterr().err


@pytest.mark.slow
def test_a_campaign_builds_until_stable_stats_and_refuses_another_eps(
    ray_local: None, tiny_testbed: Path, tmp_path: Path
) -> None:
    build = {"corpus": [str(tiny_testbed / CORPUS_FILE)], "shards": 4, "actors": 1,
             "until_stable": 0.5, "probes": 4}  # fmt: skip
    spec_file = write_spec(tmp_path, tiny_testbed, tmp_path / "stats", n_edits=2,
                           hparams={"layer": 0, "context_templates": ["{}"]},
                           stats_build=build)  # fmt: skip
    assert run_campaign(load_spec(spec_file), tmp_path / "c").status == "done"
    built = load_accumulators(tmp_path / "stats").meta.until_stable
    assert built["eps"] == 0.5 and built["probes"] == 2  # the campaign's two requests
    assert built["shards_used"] <= 4
    again = tmp_path / "again"
    again.mkdir()
    spec_file = write_spec(again, tiny_testbed, tmp_path / "stats", n_edits=2,
                           hparams={"layer": 0, "context_templates": ["{}"]},
                           stats_build={**build, "until_stable": 0.1})  # fmt: skip
    with pytest.raises(StatsStoreError, match=r"until_stable\.eps is 0\.5"):
        run_campaign(load_spec(spec_file), tmp_path / "c2")
