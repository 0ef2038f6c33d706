"""Sharded second moments on Ray: equal to one process and to a plain per-layer pass,
resumable after an actor or the driver dies, never recomputing a finished shard."""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from pathlib import Path

import pytest
import torch

from seqedit.pipeline.cli.campaign_ops import validate_spec
from seqedit.pipeline.cli.main import main
from seqedit.pipeline.run.driver import run_campaign
from seqedit.pipeline.run.stats_job import build_stats_sharded, shard_path, split
from seqedit.schemas.campaign import load_spec
from seqedit.testbed.build import CORPUS_FILE
from seqedit.workers.corpus import iter_documents
from seqedit.workers.model_io import load_model
from seqedit.workers.stats import StatsConfig, StatsStoreError, compute_stats
from seqedit.workers.stats_store import load_accumulators
from tests.pipeline.specs import write_spec

LAYERS = [1, 2, 3]


def _config(testbed: Path) -> StatsConfig:
    return StatsConfig(layers=LAYERS, corpus=[testbed / CORPUS_FILE], batch_size=8,
                       dtype="float64")  # fmt: skip


def _sums(result) -> dict[int, torch.Tensor]:  # type: ignore[no-untyped-def]
    return {layer: acc.sum for layer, acc in result.accumulators.items()}


def _assert_close(ours: dict[int, torch.Tensor], theirs: dict[int, torch.Tensor]) -> None:
    assert sorted(ours) == sorted(theirs)
    for layer in ours:
        error = (ours[layer] - theirs[layer]).norm() / theirs[layer].norm()
        assert error <= 1e-6, f"layer {layer}: relative error {error:.2e}"


def _plain_per_layer(testbed: Path, config: StatsConfig) -> dict[int, torch.Tensor]:
    """The reference way: for each layer alone, a full forward pass of each document and a
    running sum of k kᵀ over its tokens (no batching, no padding, no early stop)."""
    model, tokenizer = load_model(testbed)
    sums = {}
    for layer in config.layers:
        module = dict(model.named_modules())[config.module_tmp.format(layer)]
        total = torch.zeros(0)
        captured: list[torch.Tensor] = []
        handle = module.register_forward_pre_hook(
            lambda _m, args, into=captured: into.append(args[0])
        )
        with torch.no_grad():
            for text in iter_documents(config.corpus):
                ids = tokenizer(text, truncation=True, max_length=model.config.n_positions,
                                return_tensors="pt").input_ids  # fmt: skip
                captured.clear()
                model(ids)
                keys = captured[0][0].double()  # (T, d_in)
                total = keys.T @ keys if total.numel() == 0 else total + keys.T @ keys
        handle.remove()
        sums[layer] = total
    return sums


@pytest.mark.slow
def test_sharded_equals_one_process_and_a_plain_pass(
    ray_local: None, tiny_testbed: Path, tmp_path: Path
) -> None:
    config = _config(tiny_testbed)
    single = compute_stats(tiny_testbed, config, progress=False)
    sharded, report = build_stats_sharded(tiny_testbed, config, tmp_path / "s", shards=4,
                                          actors=2, progress=False)  # fmt: skip
    assert (report.shards, report.computed, report.reused) == (4, 4, 0)
    assert sharded.meta.token_count == single.meta.token_count
    assert {acc.count for acc in sharded.accumulators.values()} == {single.meta.token_count}
    _assert_close(_sums(sharded), _sums(single))
    _assert_close(_sums(sharded), _plain_per_layer(tiny_testbed, config))
    stored = load_accumulators(tmp_path / "s")  # saved in the format campaigns load
    _assert_close(_sums(stored), _sums(single))


def test_split_is_contiguous_and_covers_everything() -> None:
    assert split(list(range(10)), 4) == [[0, 1, 2], [3, 4, 5], [6, 7], [8, 9]]
    assert split(range(10), 4) == [range(0, 3), range(3, 6), range(6, 8), range(8, 10)]
    assert split([3, 5], 4) == [[3], [5]]


def _busy_worker_pid() -> int:
    """The process of a covariance actor computing a shard (Ray titles an actor's
    process "ray::<Class>.<method>" while the method runs)."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
            try:
                title = cmdline.read_bytes()
            except OSError:  # the process ended meanwhile
                continue
            if b"ray::CovarianceActor.run_shard" in title:
                return int(cmdline.parent.name)
        time.sleep(0.01)
    raise TimeoutError("no covariance actor was computing a shard")


@pytest.mark.extended  # in CI: a corrupt partial recomputed, a build resumed from its
# partials on S3; this adds killed actors and drivers (make test-extended)
def test_a_killed_actor_and_a_killed_driver_lose_no_finished_shard(
    ray_local: None, tiny_testbed: Path, tmp_path: Path
) -> None:
    config = _config(tiny_testbed)
    reference, _ = build_stats_sharded(tiny_testbed, config, tmp_path / "ref", shards=4,
                                       actors=1, progress=False)  # fmt: skip

    finished: list[int] = []

    def kill_a_busy_worker(index: int) -> None:  # SIGKILL, as the OOM killer would
        finished.append(index)
        if len(finished) == 1:
            os.kill(_busy_worker_pid(), signal.SIGKILL)

    killed, report = build_stats_sharded(tiny_testbed, config, tmp_path / "k", shards=8,
                                         actors=2, progress=False,
                                         on_shard_done=kill_a_busy_worker)  # fmt: skip
    assert report.retried == 1 and report.computed == 8
    assert sorted(finished) == list(range(8))  # each shard finished (and was written) once
    _assert_close(_sums(killed), _sums(reference))

    class DriverDied(Exception):
        pass

    def die_after_two(index: int) -> None:
        die_after_two.done += 1  # type: ignore[attr-defined]
        if die_after_two.done == 2:  # type: ignore[attr-defined]
            raise DriverDied

    die_after_two.done = 0  # type: ignore[attr-defined]
    with pytest.raises(DriverDied):
        build_stats_sharded(tiny_testbed, config, tmp_path / "d", shards=4, actors=1,
                            progress=False, on_shard_done=die_after_two)  # fmt: skip
    assert sum(shard_path(tmp_path / "d", i).is_file() for i in range(4)) == 2
    resumed, report = build_stats_sharded(tiny_testbed, config, tmp_path / "d", shards=4,
                                          actors=2, progress=False)  # fmt: skip
    assert (report.reused, report.computed) == (2, 2)  # the finished shards are not redone
    _assert_close(_sums(resumed), _sums(reference))


@pytest.mark.slow
def test_a_corrupt_partial_is_recomputed_and_another_jobs_partials_dropped(
    ray_local: None, tiny_testbed: Path, tmp_path: Path
) -> None:
    config = _config(tiny_testbed)
    first, _ = build_stats_sharded(tiny_testbed, config, tmp_path / "s", shards=2, actors=1,
                                   progress=False)  # fmt: skip
    partial = shard_path(tmp_path / "s", 1)
    partial.write_bytes(partial.read_bytes()[:-8] + b"\0" * 8)  # bytes flipped at the end
    again, report = build_stats_sharded(tiny_testbed, config, tmp_path / "s", shards=2,
                                        actors=1, progress=False)  # fmt: skip
    assert (report.reused, report.computed) == (1, 1)
    _assert_close(_sums(again), _sums(first))
    other = config.model_copy(update={"layers": [1]})
    _, report = build_stats_sharded(tiny_testbed, other, tmp_path / "s", shards=2, actors=1,
                                    progress=False)  # fmt: skip
    assert report.reused == 0  # partials of another job are never merged in


@pytest.mark.slow
def test_a_campaign_builds_its_stats_then_refuses_stats_of_another_corpus(
    ray_local: None, tiny_testbed: Path, tmp_path: Path
) -> None:
    corpus = str(tiny_testbed / CORPUS_FILE)
    build = {"corpus": [corpus], "shards": 2, "actors": 1}
    spec_file = write_spec(tmp_path, tiny_testbed, tmp_path / "stats", n_edits=2,
                           hparams={"layer": 0, "context_templates": ["{}"]},
                           stats_build=build)  # fmt: skip
    validate_spec(spec_file)  # no stats yet: fine, the campaign builds them
    assert run_campaign(load_spec(spec_file), tmp_path / "c").status == "done"
    built = load_accumulators(tmp_path / "stats").meta
    assert (built.layers, built.corpus_files) == ([0], [CORPUS_FILE])
    single = compute_stats(tiny_testbed, StatsConfig(layers=[0], corpus=[corpus],
                                                     batch_size=32), progress=False)  # fmt: skip
    _assert_close(_sums(load_accumulators(tmp_path / "stats")), _sums(single))

    other = tmp_path / "other.txt"
    other.write_text("a different corpus\nof two documents\n", encoding="utf-8")
    again = tmp_path / "again"
    again.mkdir()
    spec_file = write_spec(again, tiny_testbed, tmp_path / "stats", n_edits=2,
                           hparams={"layer": 0, "context_templates": ["{}"]},
                           stats_build={**build, "corpus": [str(other)]})  # fmt: skip
    with pytest.raises(StatsStoreError, match="corpus_fingerprint"):
        run_campaign(load_spec(spec_file), tmp_path / "c2")


def test_stats_ls_lists_and_checks(tiny_stats: Path, tmp_path: Path,
                                   capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    root = tmp_path / "cache"
    shutil.copytree(tiny_stats, root / "good")
    shutil.copytree(tiny_stats, root / "bad")
    data = root / "bad" / "stats.safetensors"
    data.write_bytes(data.read_bytes()[:-4] + b"\0\0\0\0")
    assert main(["stats", "ls", str(root), "--format", "json"]) in (0, None)
    rows = {r["dir"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["good"]["status"] == "ok" and rows["good"]["layers"] == "0"
    assert rows["bad"]["status"].startswith("refused:")
