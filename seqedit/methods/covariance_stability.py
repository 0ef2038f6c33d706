"""When covariance statistics are good enough: the quantities edits use, chunk to chunk.

ROME and MEMIT use the covariance C of a layer's rewrite-module inputs through C^-1 k for
the keys k of the edited subjects; AlphaEdit through its null-space projector P (the
eigenvectors of C below `nullspace_threshold`) applied to those keys. As the token count
grows these settle long before C itself stops changing in directions no edit touches.
`probe_quantities` computes them from one running estimate of C, and `relative_change`
compares two estimates: max over layers of ||Q_new - Q_old||_F / ||Q_new||_F.
"""

from __future__ import annotations

import math

import torch

INVERSE, PROJECTED = "inverse_keys", "projected_keys"


def inverse_keys(moment: torch.Tensor, keys: torch.Tensor) -> torch.Tensor | None:
    """C^-1 K^T (d_in, n) in float64 for C (d_in, d_in) and keys K (n, d_in); None when C is
    exactly singular. A nearly singular C (fewer tokens than input dimensions) solves to
    noise that changes from chunk to chunk, so it never passes as stable."""
    c = moment.double()
    solution, info = torch.linalg.solve_ex(c, keys.double().T)
    if int(info) != 0 or not bool(torch.isfinite(solution).all()):
        return None
    return solution


def projected_keys(moment: torch.Tensor, keys: torch.Tensor, threshold: float) -> torch.Tensor:
    """P K^T (d_in, n) in float64, P = U0 U0^T with U0 the eigenvectors of C (d_in, d_in)
    whose eigenvalue is below `threshold` (AlphaEdit's projector, by `eigh` here)."""
    eigenvalues, vectors = torch.linalg.eigh(moment.double())
    null = vectors[:, eigenvalues < threshold]  # (d_in, r0)
    return null @ (null.T @ keys.double().T)


def inverse_quantities(
    moments: dict[int, torch.Tensor], keys: dict[int, torch.Tensor]
) -> dict[str, torch.Tensor | None]:
    """Name "inverse_keys.<layer>" -> C^-1 K^T (or None: C singular) for every layer of
    `keys` (layer -> (n, d_in))."""
    return {
        f"{INVERSE}.{layer}": inverse_keys(moments[layer], k) for layer, k in sorted(keys.items())
    }


def projected_quantities(
    moments: dict[int, torch.Tensor], keys: dict[int, torch.Tensor], threshold: float
) -> dict[str, torch.Tensor | None]:
    """Name "projected_keys.<layer>" -> P K^T for every layer of `keys` (an
    eigendecomposition of each C: the costly one)."""
    return {
        f"{PROJECTED}.{layer}": projected_keys(moments[layer], k, threshold)
        for layer, k in sorted(keys.items())
    }


def probe_quantities(
    moments: dict[int, torch.Tensor],
    keys: dict[int, torch.Tensor],
    nullspace_threshold: float | None = None,
) -> dict[str, torch.Tensor | None]:
    """`inverse_quantities` and, with a threshold, `projected_quantities`."""
    out = inverse_quantities(moments, keys)
    if nullspace_threshold is not None:
        out |= projected_quantities(moments, keys, nullspace_threshold)
    return out


def relative_change(
    old: dict[str, torch.Tensor | None], new: dict[str, torch.Tensor | None]
) -> dict[str, float]:
    """Quantity name -> ||new - old||_F / ||new||_F (inf when either is missing; 0 when both
    are zero, e.g. an empty null space both times)."""
    changes: dict[str, float] = {}
    for name, value in new.items():
        before = old.get(name)
        if value is None or before is None:
            changes[name] = math.inf
            continue
        scale = float(value.norm())
        diff = float((value - before).norm())
        changes[name] = 0.0 if diff == 0.0 else (diff / scale if scale > 0 else math.inf)
    return changes
