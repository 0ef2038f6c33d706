"""The covariance stats cache on an object store: the stats files, the derived-tensor cache,
the sharded build with its partials and the `seqedit stats` commands all work on an S3 URI
(a local moto server) as on a local path, and refuse altered files naming their URI."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import pytest
import torch

from seqedit.pipeline.cli.main import main
from seqedit.pipeline.run.campaign_stats import ensure_campaign_stats
from seqedit.pipeline.run.stats_job import build_stats_sharded, shard_path
from seqedit.schemas.campaign import load_spec
from seqedit.storage import Location, location
from seqedit.testbed.build import CORPUS_FILE
from seqedit.workers.derived_store import DERIVED_DIR
from seqedit.workers.editor import SequentialEditor
from seqedit.workers.stats import META_FILE, STATS_FILE, StatsConfig, StatsStoreError
from seqedit.workers.stats_store import load_accumulators, load_stats, save_stats
from tests.conftest import TINY_LAYER
from tests.pipeline.specs import write_spec
from tests.workers.test_every_method import QUICK_HPARAMS


def _upload(stats: Path, to: Location) -> Location:
    """A copy of the local stats directory `stats` (its two files) at `to`."""
    for name in (STATS_FILE, META_FILE):
        (to / name).write_bytes((stats / name).read_bytes())
    return to


def _assert_same_sums(ours: dict, theirs: dict) -> None:  # type: ignore[type-arg]
    assert sorted(ours) == sorted(theirs)
    for layer in ours:
        assert ours[layer].count == theirs[layer].count
        assert torch.equal(ours[layer].sum, theirs[layer].sum)


def test_stats_round_trip_on_s3_equal_to_local(
    tiny_stats: Path, tmp_path: Path, s3_root: str
) -> None:
    result = load_accumulators(tiny_stats)
    remote = save_stats(s3_root, result)
    local = save_stats(tmp_path / "local", result)
    assert remote == location(s3_root) and not remote.is_local
    assert sorted(entry.name for entry in remote.iterdir()) == sorted([META_FILE, STATS_FILE])
    # the sidecar's sha256 is that of the bytes stored on S3
    sidecar = json.loads((remote / META_FILE).read_text())
    assert sidecar["sha256"] == hashlib.sha256((remote / STATS_FILE).read_bytes()).hexdigest()
    back, here = load_accumulators(s3_root), load_accumulators(local)
    assert back.meta == here.meta == result.meta
    _assert_same_sums(back.accumulators, here.accumulators)
    _assert_same_sums(back.accumulators, result.accumulators)
    moments = load_stats(s3_root, layers=[TINY_LAYER], dtype=torch.float32)
    expected = load_stats(local, layers=[TINY_LAYER], dtype=torch.float32)
    assert torch.equal(moments[TINY_LAYER], expected[TINY_LAYER])


def test_corrupt_or_missing_stats_on_s3_are_refused_naming_the_uri(
    tiny_stats: Path, s3_root: str
) -> None:
    root = location(s3_root)
    with pytest.raises(StatsStoreError, match=re.escape(f"{root / STATS_FILE}: stats file not")):
        load_accumulators(s3_root)

    stats = _upload(tiny_stats, root) / STATS_FILE
    good = stats.read_bytes()
    data = bytearray(good)
    data[-100] ^= 0xFF  # inside the tensor data; the header stays valid
    stats.write_bytes(bytes(data))
    with pytest.raises(StatsStoreError, match=re.escape(f"{stats}: tensors_sha256")):
        load_accumulators(s3_root)

    stats.write_bytes(good[: len(good) // 2])
    with pytest.raises(StatsStoreError, match=re.escape(f"{stats}: corrupt or truncated")):
        load_accumulators(s3_root)

    # the file's sha256 is checked against the sidecar, hashed from the file on S3
    stats.write_bytes(good)
    sidecar = json.loads((root / META_FILE).read_text())
    (root / META_FILE).write_text(json.dumps({**sidecar, "sha256": "0" * 64}))
    with pytest.raises(StatsStoreError, match=re.escape(f"{stats}: sha256 differs from")):
        load_accumulators(s3_root)
    assert load_accumulators(s3_root, verify_hash=False).meta.token_count > 0


def test_derived_cache_is_written_and_reused_on_s3(
    tiny_testbed: Path, tiny_stats: Path, s3_root: str
) -> None:
    stats = _upload(tiny_stats, location(s3_root))
    hparams = {**QUICK_HPARAMS["rome"], "mom2_adjustment": True}

    def editor() -> SequentialEditor:
        return SequentialEditor(str(tiny_testbed), "rome", hparams, stats_dir=s3_root,
                                campaign="t")  # fmt: skip

    first = editor()
    assert first.derived_counts == {"loaded": 0, "computed": 1}
    (cached,) = (stats / DERIVED_DIR).glob("rome-layer*.safetensors")
    assert str(cached).startswith(f"{str(stats).split('?')[0]}/{DERIVED_DIR}/rome-layer")
    second = editor()
    assert second.derived_counts == {"loaded": 1, "computed": 0}
    assert torch.equal(first.context.inv_second_moment, second.context.inv_second_moment)

    cached.write_bytes(b"not a safetensors file")
    with pytest.raises(StatsStoreError, match=re.escape(f"{cached}: unreadable")):
        editor()


def _config(testbed: Path) -> StatsConfig:
    return StatsConfig(layers=[1, 2], corpus=[testbed / CORPUS_FILE], batch_size=8,
                       dtype="float64")  # fmt: skip


@pytest.mark.slow
def test_sharded_build_on_s3_equals_local_and_resumes_from_its_partials(
    ray_local: None, tiny_testbed: Path, tmp_path: Path, s3_root: str
) -> None:
    config = _config(tiny_testbed)
    local, _ = build_stats_sharded(tiny_testbed, config, tmp_path / "local", shards=2,
                                   actors=1, progress=False)  # fmt: skip

    class DriverDied(Exception):
        pass

    def die(index: int) -> None:
        raise DriverDied

    with pytest.raises(DriverDied):  # killed after the first shard's partial is on S3
        build_stats_sharded(tiny_testbed, config, s3_root, shards=2, actors=1, progress=False,
                            on_shard_done=die)  # fmt: skip
    assert [shard_path(s3_root, i).is_file() for i in range(2)].count(True) == 1
    assert (location(s3_root) / "shards" / "job.json").is_file()
    assert not (location(s3_root) / STATS_FILE).exists()

    remote, report = build_stats_sharded(tiny_testbed, config, s3_root, shards=2, actors=1,
                                         progress=False)  # fmt: skip
    assert (report.reused, report.computed) == (1, 1)  # the partial on S3 is not redone
    _assert_same_sums(remote.accumulators, local.accumulators)
    _assert_same_sums(load_accumulators(s3_root).accumulators, local.accumulators)

    partial = shard_path(s3_root, 1)  # a corrupt partial is removed and recomputed
    partial.write_bytes(partial.read_bytes()[:-8] + b"\0" * 8)
    again, report = build_stats_sharded(tiny_testbed, config, s3_root, shards=2, actors=1,
                                        progress=False)  # fmt: skip
    assert (report.reused, report.computed) == (1, 1)
    _assert_same_sums(again.accumulators, local.accumulators)

    other = config.model_copy(update={"layers": [1]})  # another job's partials are dropped
    _, report = build_stats_sharded(tiny_testbed, other, s3_root, shards=2, actors=1,
                                    progress=False)  # fmt: skip
    assert report.reused == 0


def test_cli_builds_stats_on_s3_and_lists_them(
    tiny_testbed: Path, tiny_stats: Path, s3_root: str, capsys: pytest.CaptureFixture[str]
) -> None:
    root = location(s3_root)
    good = str(root / "good")
    corpus = str(tiny_testbed / CORPUS_FILE)
    args = ["stats", "build", "--model", str(tiny_testbed), "--layers", str(TINY_LAYER),
            "--corpus", corpus, "--batch-size", "64", "--out", good, "--quiet"]  # fmt: skip
    assert main(args) in (0, None)
    assert f"-> {good}" in capsys.readouterr().out
    built = load_accumulators(good)
    _assert_same_sums(built.accumulators, load_accumulators(tiny_stats).accumulators)

    bad = _upload(tiny_stats, root / "nested" / "bad") / STATS_FILE
    bad.write_bytes(bad.read_bytes()[:-4] + b"\0\0\0\0")
    assert main(["stats", "ls", s3_root, "--format", "json"]) in (0, None)
    rows = {row["dir"]: row for row in json.loads(capsys.readouterr().out)}
    assert sorted(rows) == ["good", "nested/bad"]
    assert rows["good"]["status"] == "ok" and rows["good"]["layers"] == str(TINY_LAYER)
    assert rows["good"]["tokens"] == built.meta.token_count
    assert rows["nested/bad"]["status"].startswith("refused:")


def test_a_campaign_uses_the_stats_found_on_s3_and_refuses_other_ones(
    tiny_testbed: Path, tiny_stats: Path, tmp_path: Path, s3_root: str
) -> None:
    root = _upload(tiny_stats, location(s3_root))
    corpus = str(tiny_testbed / CORPUS_FILE)
    spec_file = write_spec(tmp_path, tiny_testbed, s3_root,  # type: ignore[arg-type]
                           n_edits=2, stats_build={"corpus": [corpus]})  # fmt: skip
    assert load_spec(spec_file).stats == s3_root  # the URI is kept as it is
    ensure_campaign_stats(load_spec(spec_file), [])  # found and checked: nothing built
    assert not (root / "shards").exists()

    other = tmp_path / "other.txt"
    other.write_text("a different corpus\nof two documents\n", encoding="utf-8")
    spec_file = write_spec(tmp_path, tiny_testbed, s3_root,  # type: ignore[arg-type]
                           n_edits=2, stats_build={"corpus": [str(other)]})  # fmt: skip
    with pytest.raises(StatsStoreError,
                       match=re.escape(f"{root / META_FILE}: corpus_fingerprint")):  # fmt: skip
        ensure_campaign_stats(load_spec(spec_file), [])
