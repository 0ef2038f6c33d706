"""`seqedit stats import --projector`: AlphaEdit's saved null-space projectors become the
derived tensors an AlphaEdit campaign loads; anything that is not such a projector of these
stats (another threshold, another model, not a projector, not a tensor file) is refused by
name and nothing is written."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch

from seqedit.methods.alphaedit import (
    ALPHAEDIT,
    AlphaEditConfig,
    null_space_projector,
    projector_from_basis,
)
from seqedit.pipeline.cli.main import main
from seqedit.pipeline.cli.stats_import_command import AlphaEditDefaults
from seqedit.workers.derived_store import DERIVED_DIR, derived_tensors
from seqedit.workers.projector_import import import_null_space_projector
from seqedit.workers.stats import StatsStoreError
from seqedit.workers.stats_store import load_stats
from tests.workers.test_stats_import import _cache, _d_in

LAYERS = [1, 0]  # AlphaEdit's hparams order need not be ascending


@pytest.fixture
def imported(tiny_testbed: Path, tmp_path: Path) -> tuple[Path, dict[int, torch.Tensor], float]:
    """(stats dir imported from two random caches, C by layer (float32), a threshold that
    splits C's spectrum)."""
    files = [_cache(tmp_path / "wiki_stats", layer, _d_in(tiny_testbed)) for layer in (0, 1)]
    out = tmp_path / "stats"
    main(["stats", "import", *map(str, files), "--model", str(tiny_testbed), "--out", str(out)])
    moments = load_stats(out, layers=[0, 1], model_dir=tiny_testbed, dtype=torch.float32)
    threshold = float(torch.linalg.eigvalsh(moments[0].double()).max()) / 4
    return out, moments, threshold


def _save(path: Path, projectors: list[torch.Tensor]) -> Path:
    torch.save(torch.stack(projectors), path)
    return path


def test_imported_projector_is_what_a_campaign_loads(
    tiny_testbed: Path, tmp_path: Path, imported: tuple[Path, dict[int, torch.Tensor], float]
) -> None:
    out, moments, threshold = imported
    ours = {layer: null_space_projector(moments[layer], threshold) for layer in LAYERS}
    path = _save(tmp_path / "null_space_project.pt", [ours[layer] for layer in LAYERS])
    written = import_null_space_projector(path, out, tiny_testbed, layers=LAYERS,
                                          nullspace_threshold=threshold)  # fmt: skip
    assert sorted(written) == [0, 1]
    assert all(0 < rank < moments[0].shape[0] for _, rank in written.values())
    config = AlphaEditConfig(layers=[0, 1], v_loss_layer=3, nullspace_threshold=threshold)
    derived, counts = derived_tensors(ALPHAEDIT, config, moments, stats_dir=out)
    assert counts == {"loaded": 2, "computed": 0}
    for layer in LAYERS:
        assert torch.equal(projector_from_basis(derived[layer]), ours[layer])
    other = config.model_copy(update={"nullspace_threshold": threshold / 2})
    assert derived_tensors(ALPHAEDIT, other, moments, stats_dir=out)[1]["computed"] == 2


def test_cli_imports_a_projector_into_existing_stats(
    tiny_testbed: Path,
    tmp_path: Path,
    imported: tuple[Path, dict[int, torch.Tensor], float],
    capsys: pytest.CaptureFixture[str],
) -> None:
    out, moments, threshold = imported
    path = _save(tmp_path / "p.pt", [null_space_projector(moments[x], threshold) for x in LAYERS])
    args = ["stats", "import", "--model", str(tiny_testbed), "--out", str(out)]
    assert main([*args, "--projector", str(path), "--projector-layers", "1,0",
                 "--nullspace-threshold", repr(threshold)]) == 0  # fmt: skip
    assert "imported the null-space projectors" in capsys.readouterr().out
    assert len(list((out / DERIVED_DIR).glob("alphaedit-layer*.safetensors"))) == 2


def test_default_threshold_is_alphaedits() -> None:
    field = AlphaEditConfig.model_fields["nullspace_threshold"]
    assert AlphaEditDefaults.threshold == field.default


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize(
    "case, message",
    [
        ("larger threshold", "which exceeds nullspace_threshold"),
        ("identity", "which exceeds nullspace_threshold"),
        ("not symmetric", "not symmetric"),
        ("not idempotent", "P P != P"),
        ("three layers", "holds 3 projector(s), but 2 layer(s)"),
        ("wrong width", "a projector of another model or layer"),
        ("a dict", "holds a dict"),
        ("a pickled object", "not a tensor file torch.load can read safely"),
        ("truncated", "not a tensor file torch.load can read safely"),
        ("NaN", "NaN"),
    ],
)
def test_refused_by_name_and_nothing_written(
    tiny_testbed: Path,
    tmp_path: Path,
    imported: tuple[Path, dict[int, torch.Tensor], float],
    case: str,
    message: str,
) -> None:
    out, moments, threshold = imported
    good = [null_space_projector(moments[layer], threshold) for layer in LAYERS]
    d_in = good[0].shape[0]
    path = tmp_path / "bad.pt"
    if case == "larger threshold":
        _save(path, [good[0], null_space_projector(moments[0], threshold * 3)])
    elif case == "identity":
        _save(path, [good[0], torch.eye(d_in)])
    elif case == "not symmetric":
        _save(path, [good[0], good[1] + torch.triu(torch.ones(d_in, d_in), 1) * 0.1])
    elif case == "not idempotent":
        _save(path, [good[0], good[1] * 0.5])
    elif case == "three layers":
        _save(path, [*good, good[0]])
    elif case == "wrong width":
        _save(path, [torch.eye(d_in + 1), torch.eye(d_in + 1)])
    elif case == "a dict":
        torch.save({"P": torch.stack(good)}, path)
    elif case == "a pickled object":
        path.write_bytes(pickle.dumps(Path("x")))
    elif case == "truncated":
        _save(path, good)
        path.write_bytes(path.read_bytes()[:200])
    elif case == "NaN":
        _save(path, [good[0], good[1] * float("nan")])
    with pytest.raises(StatsStoreError, match=r"bad\.pt") as caught:
        import_null_space_projector(path, out, tiny_testbed, layers=LAYERS,
                                    nullspace_threshold=threshold)  # fmt: skip
    assert message in str(caught.value)
    assert not (out / DERIVED_DIR).exists()
