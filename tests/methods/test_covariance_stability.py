"""The quantities `--until-stable` watches: C^-1 K and AlphaEdit's P K, and their change."""

from __future__ import annotations

import math

import torch

from seqedit.methods.alphaedit import null_space_projector
from seqedit.methods.covariance_stability import (
    inverse_keys,
    probe_quantities,
    projected_keys,
    relative_change,
)


def _moment(d: int, n: int, seed: int = 0) -> torch.Tensor:
    x = torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return x.T @ x / n


def test_inverse_keys_solves_and_refuses_a_singular_moment() -> None:
    c, k = _moment(6, 50), torch.randn(3, 6, dtype=torch.float64)
    torch.testing.assert_close(inverse_keys(c, k), torch.linalg.inv(c) @ k.T)
    assert inverse_keys(torch.zeros(6, 6), k) is None


def test_projected_keys_use_alphaedits_projector() -> None:
    c, k = _moment(8, 12), torch.randn(4, 8, dtype=torch.float64)
    eigen = torch.linalg.eigvalsh(c)
    threshold = float(eigen[3] + eigen[4]) / 2  # between two eigenvalues: rank-4 null space
    expected = null_space_projector(c, threshold) @ k.T
    torch.testing.assert_close(projected_keys(c, k, threshold), expected)
    names = set(probe_quantities({2: c}, {2: k}, threshold))
    assert names == {"inverse_keys.2", "projected_keys.2"}
    assert set(probe_quantities({2: c}, {2: k})) == {"inverse_keys.2"}


def test_relative_change() -> None:
    a = torch.ones(3, 2)
    assert relative_change({"q": a}, {"q": a}) == {"q": 0.0}
    assert math.isclose(relative_change({"q": a}, {"q": a * 1.1})["q"], 0.1 / 1.1, rel_tol=1e-6)
    assert relative_change({}, {"q": a})["q"] == math.inf  # the first chunk
    assert relative_change({"q": a}, {"q": None})["q"] == math.inf  # singular now
    zero = torch.zeros(3, 2)
    assert relative_change({"q": zero}, {"q": zero})["q"] == 0.0  # an empty null space twice
