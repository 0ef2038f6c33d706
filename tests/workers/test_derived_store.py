"""The derived-tensor cache: AlphaEdit's null-space basis and ROME's C^-1 next to the stats."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from seqedit.methods.alphaedit import (
    NULL_BASIS,
    RANGE_BASIS,
    null_space_basis,
    null_space_projector,
    projector_from_basis,
)
from seqedit.testbed.build import load_testbed
from seqedit.workers.derived_store import DERIVED_DIR
from seqedit.workers.editor import SequentialEditor
from seqedit.workers.stats import StatsStoreError
from tests.conftest import TINY_LAYER
from tests.workers.test_every_method import QUICK_HPARAMS


def _moment(eigenvalues: torch.Tensor, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    n = len(eigenvalues)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=generator, dtype=eigenvalues.dtype))
    return (q * eigenvalues) @ q.T


@pytest.mark.parametrize(("n_small", "kind"), [(3, NULL_BASIS), (13, RANGE_BASIS)])
def test_the_smaller_basis_gives_the_same_projector(n_small: int, kind: str) -> None:
    eigenvalues = torch.cat([torch.full((n_small,), 1e-4), torch.linspace(1.0, 2.0, 16 - n_small)])
    c = _moment(eigenvalues.double())
    basis = null_space_basis(c, 1e-2)
    assert list(basis) == [kind]
    assert basis[kind].shape[1] == min(n_small, 16 - n_small)
    torch.testing.assert_close(
        projector_from_basis(basis), null_space_projector(c, 1e-2), rtol=0, atol=1e-12
    )


def _alphaedit(model: Path, stats: Path, **extra: object) -> SequentialEditor:
    hparams = {**QUICK_HPARAMS["alphaedit"], **extra}
    return SequentialEditor(str(model), "alphaedit", hparams, stats_dir=str(stats), campaign="t")


@pytest.fixture()
def stats_copy(tiny_stats: Path, tmp_path: Path) -> Path:
    """The session's stats without the cache other tests' editors wrote into it."""
    ignore = shutil.ignore_patterns(DERIVED_DIR)
    return Path(shutil.copytree(tiny_stats, tmp_path / "stats", ignore=ignore))


def test_second_campaign_loads_the_basis_and_gets_the_same_projector(
    tiny_testbed: Path, stats_copy: Path
) -> None:
    first = _alphaedit(tiny_testbed, stats_copy)
    assert first.derived_counts == {"loaded": 0, "computed": 1}
    (cached,) = (stats_copy / DERIVED_DIR).glob("alphaedit-layer*.safetensors")
    basis = load_file(cached)
    d_in = first.context.projectors[TINY_LAYER].shape[0]
    assert len(basis) == 1 and next(iter(basis.values())).shape[1] <= d_in // 2

    second = _alphaedit(tiny_testbed, stats_copy)
    assert second.derived_counts == {"loaded": 1, "computed": 0}
    assert torch.equal(second.context.projectors[TINY_LAYER], first.context.projectors[TINY_LAYER])

    other = _alphaedit(tiny_testbed, stats_copy, nullspace_threshold=1e-3)
    assert other.derived_counts == {"loaded": 0, "computed": 1}  # threshold is in the key
    assert len(list((stats_copy / DERIVED_DIR).glob("*.safetensors"))) == 2


def test_corrupt_or_foreign_cache_file_is_refused_by_name(
    tiny_testbed: Path, stats_copy: Path
) -> None:
    _alphaedit(tiny_testbed, stats_copy)
    (cached,) = (stats_copy / DERIVED_DIR).glob("*.safetensors")
    tensors = load_file(cached)
    save_file(tensors, str(cached), metadata={"derived_key": "{}", "tensors_sha256": "x"})
    with pytest.raises(StatsStoreError, match=r"field derived_key .*delete"):
        _alphaedit(tiny_testbed, stats_copy)
    cached.write_bytes(b"not a safetensors file")
    with pytest.raises(StatsStoreError, match=re.escape(f"{cached}: unreadable")):
        _alphaedit(tiny_testbed, stats_copy)


def test_rome_caches_its_inverse(tiny_testbed: Path, stats_copy: Path) -> None:
    hparams = {**QUICK_HPARAMS["rome"], "mom2_adjustment": True}
    first = SequentialEditor(
        str(tiny_testbed), "rome", hparams, stats_dir=str(stats_copy), campaign="t"
    )
    second = SequentialEditor(
        str(tiny_testbed), "rome", hparams, stats_dir=str(stats_copy), campaign="t"
    )
    assert (first.derived_counts, second.derived_counts) == (
        {"loaded": 0, "computed": 1},
        {"loaded": 1, "computed": 0},
    )
    assert torch.equal(first.context.inv_second_moment, second.context.inv_second_moment)


def test_edits_are_bit_identical_whether_the_cache_was_hit_or_missed(
    tiny_testbed: Path, stats_copy: Path
) -> None:
    """A loaded buffer is aligned differently from a computed one, and BLAS may round
    differently on it: the store hands out fresh allocations either way."""
    _, requests = load_testbed(tiny_testbed)
    hparams = {**QUICK_HPARAMS["rome"], "mom2_adjustment": True}
    fingerprints = []
    for expected in ({"loaded": 0, "computed": 1}, {"loaded": 1, "computed": 0}):
        editor = SequentialEditor(
            str(tiny_testbed), "rome", hparams, stats_dir=str(stats_copy), campaign="t"
        )
        assert editor.derived_counts == expected
        for step, request in enumerate(requests[:3]):
            editor.edit(request, step)
        fingerprints.append(editor.weights_fingerprint())
    assert fingerprints[0] == fingerprints[1]
