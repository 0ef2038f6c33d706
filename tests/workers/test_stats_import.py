"""`seqedit stats import`: the reference code's .npz second-moment caches become our stats;
foreign, corrupt and mis-shaped files are refused by name."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from seqedit.pipeline.cli.main import main
from seqedit.workers.stats import StatsStoreError
from seqedit.workers.stats_import import import_reference_stats
from seqedit.workers.stats_store import load_accumulators, load_stats, save_stats
from tests.golden import require_golden, write_reference_npz

MODULE = "transformer.h.{}.mlp.c_proj"


def _cache(folder: Path, layer: int, d_in: int, **overrides: object) -> Path:
    """A reference-layout cache of `layer` of a random second moment."""
    folder.mkdir(parents=True, exist_ok=True)
    keys = torch.randn(50, d_in, generator=torch.Generator().manual_seed(layer))
    entries: dict[str, object] = {
        "constructor": np.array("util.runningstats.CombinedStat()"),
        "mom2.constructor": np.array("util.runningstats.SecondMoment()"),
        "mom2.count": np.array(50),
        "mom2.mom2": (keys.T @ keys).numpy(),
        "sample_size": np.array(7),
    }
    entries.update(overrides)
    path = folder / f"{MODULE.format(layer)}_float32_mom2_7.npz"
    np.savez(path, **{k: v for k, v in entries.items() if v is not None})
    return path


def _d_in(tiny_testbed: Path) -> int:
    import json

    config = json.loads((tiny_testbed / "config.json").read_text())
    return 4 * int(config["n_embd"])


def test_golden_caches_import_to_the_golden_covariance(tmp_path: Path) -> None:
    golden = require_golden()
    modules = [MODULE.format(layer) for layer in (1, 2)]
    files = write_reference_npz(golden, modules, tmp_path / "data" / "stats")
    result = import_reference_stats(files, golden.root / "model")
    save_stats(tmp_path / "out", result)
    moments = load_stats(tmp_path / "out", layers=[1, 2], model_dir=golden.root / "model")
    for layer, module in zip((1, 2), modules, strict=True):
        assert torch.equal(moments[layer], golden.second_moment(module))  # bit for bit
    meta = load_accumulators(tmp_path / "out").meta
    assert meta.imported_from is not None
    assert meta.imported_from["datasets"] == ["wikitext"]
    assert meta.imported_from["sample_sizes"] == [golden.cov_count()]
    assert set(meta.imported_from["files"]) == {str(f) for f in files}
    assert meta.token_count == golden.cov_count()


def test_cli_imports_and_campaign_stats_load(
    tiny_testbed: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    d_in = _d_in(tiny_testbed)
    files = [_cache(tmp_path / "wiki_stats", layer, d_in) for layer in (0, 1)]
    out = tmp_path / "stats"
    args = ["stats", "import", *map(str, files), "--model", str(tiny_testbed), "--layers", "0,1"]
    assert main([*args, "--out", str(out)]) == 0
    assert "imported 2 cache(s)" in capsys.readouterr().out
    moments = load_stats(out, layers=[0, 1], model_dir=tiny_testbed)
    keys = torch.randn(50, d_in, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(moments[1], keys.T @ keys / 50)
    assert load_accumulators(out).meta.imported_from["datasets"] == ["wiki"]


def test_null_sample_size_is_read_without_pickle(tiny_testbed: Path, tmp_path: Path) -> None:
    path = _cache(tmp_path, 0, _d_in(tiny_testbed), sample_size=np.array(None, dtype=object))
    meta = import_reference_stats([path], tiny_testbed).meta
    assert meta.imported_from["sample_sizes"] == [] and meta.n_samples is None


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda f, d: _cache(f, 0, d, **{"mom2.mom2": None}), r"missing mom2\.mom2"),
        (lambda f, d: _cache(f, 0, d + 8), "takes inputs of width"),
        (lambda f, d: _cache(f, 0, d, **{"mom2.count": np.array(0)}), "no tokens were summed"),
        (
            lambda f, d: _cache(f, 0, d, **{"mom2.mom2": np.full((d, d), np.nan, np.float32)}),
            "NaN",
        ),
        (lambda f, d: _cache(f, 9, d), "the model has 4 layers"),
        (lambda f, d: _corrupt(f), "not a readable .npz"),
        (lambda f, d: _renamed(_cache(f, 0, d), "weights.npz"), "not a reference second-moment"),
        (
            lambda f, d: _renamed(
                _cache(f, 0, d), "transformer.h.0.attn.c_attn_float32_mom2_7.npz"
            ),
            "not a rewrite module",
        ),
    ],
)
def test_foreign_corrupt_and_misshaped_files_are_refused_by_name(
    tiny_testbed: Path, tmp_path: Path, make: object, message: str
) -> None:
    path = make(tmp_path / "x_stats", _d_in(tiny_testbed))  # type: ignore[operator]
    with pytest.raises(StatsStoreError, match=message) as error:
        import_reference_stats([path], tiny_testbed)
    assert str(path) in str(error.value) or path.name in str(error.value)


def test_layers_must_match_the_files(tiny_testbed: Path, tmp_path: Path) -> None:
    path = _cache(tmp_path, 0, _d_in(tiny_testbed))
    with pytest.raises(
        StatsStoreError, match=r"--layers \[0, 1\] but the files cover layers \[0\]"
    ):
        import_reference_stats([path], tiny_testbed, layers=[0, 1])


def _corrupt(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{MODULE.format(0)}_float32_mom2_7.npz"
    path.write_bytes(b"PK\x03\x04 not really a zip")
    return path


def _renamed(path: Path, name: str) -> Path:
    return path.rename(path.with_name(name))
