"""Importing the null-space projectors the original AlphaEdit code saves.

That code (`experiments/evaluate.py`) computes, for each edited layer in its hparams order,
P = U0 U0^T with U0 the singular vectors of the layer's second moment C whose singular value
is below `nullspace_threshold`, and saves the stack as one tensor of shape
(n_layers, d_in, d_in) with `torch.save` (by default `null_space_project.pt`).

`import_null_space_projector` reads such a file (tensors only: `weights_only`, never
arbitrary pickled objects), checks every layer's P against the covariance already in our
stats directory (shape; symmetric; idempotent on random probes; and a projector onto
directions of C below the threshold: the largest eigenvalue of P C P, by block power
iteration, is below it), and writes it as
the derived-tensor cache entry an AlphaEdit campaign with that threshold loads
(`derived_store`), keyed by the sha256 of C, so the SVD is not computed again. The entry's
metadata records where it came from (file, sha256, index in the stack, threshold).
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoConfig

from seqedit.files import file_sha256
from seqedit.methods.alphaedit import ALPHAEDIT, PROJECTOR, AlphaEditConfig
from seqedit.methods.arch import module_names_for_type
from seqedit.storage import Location, Where
from seqedit.workers.derived_store import derived_key, derived_path, write_derived
from seqedit.workers.stats import StatsStoreError
from seqedit.workers.stats_store import load_stats

DEFAULT_FILE_NAME = "null_space_project.pt"
_PROBES = 8  # random vectors of the idempotence check
_SYMMETRY_TOL = 1e-4  # of max |P|
_IDEMPOTENCE_TOL = 1e-3  # ||P P v - P v|| / ||v||
_THRESHOLD_SLACK = 1.01  # float32 rounding of an SVD-built P


def read_projector_file(path: Path) -> torch.Tensor:
    """The (n_layers, d_in, d_in) float tensor of an AlphaEdit projector file."""
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # unpickling, zip and I/O errors all mean the same here
        raise StatsStoreError(
            f"{path}: not a tensor file torch.load can read safely ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else exc!r})"
        ) from exc
    if not isinstance(loaded, torch.Tensor):
        raise StatsStoreError(
            f"{path}: holds a {type(loaded).__name__}, expected one tensor "
            "(n_layers, d_in, d_in) as AlphaEdit saves it"
        )
    if loaded.ndim == 2:
        loaded = loaded.unsqueeze(0)
    if loaded.ndim != 3 or loaded.shape[1] != loaded.shape[2]:
        raise StatsStoreError(
            f"{path}: tensor of shape {tuple(loaded.shape)}, expected (n_layers, d_in, d_in)"
        )
    if not loaded.is_floating_point():
        raise StatsStoreError(f"{path}: tensor of dtype {loaded.dtype}, expected floats")
    return loaded


def check_projector(
    where: str, projector: torch.Tensor, moment: torch.Tensor, threshold: float
) -> int:
    """Refuse (naming `where`) a P (d_in, d_in) that is not an orthogonal projector onto
    directions of C (d_in, d_in) with eigenvalues below `threshold`; returns rank(P)."""
    if projector.shape != moment.shape:
        raise StatsStoreError(
            f"{where}: shape {tuple(projector.shape)}, but the layer's covariance is "
            f"{tuple(moment.shape)}: a projector of another model or layer"
        )
    p, c = projector.double(), moment.double()
    if not bool(torch.isfinite(p).all()):
        raise StatsStoreError(f"{where}: holds NaN or infinite values")
    scale = max(float(p.abs().max()), 1.0)
    if float((p - p.T).abs().max()) > _SYMMETRY_TOL * scale:
        raise StatsStoreError(f"{where}: not symmetric, so not an orthogonal projector")
    probes = torch.randn(p.shape[0], _PROBES, generator=torch.Generator().manual_seed(0)).double()
    once = p @ probes
    if float((p @ once - once).norm() / probes.norm()) > _IDEMPOTENCE_TOL:
        raise StatsStoreError(f"{where}: P P != P, so not a projector")
    rank = round(float(torch.trace(p)))
    largest = largest_kept_eigenvalue(p, c)
    if largest > threshold * _THRESHOLD_SLACK + 1e-7 * float(c.diagonal().abs().max()):
        raise StatsStoreError(
            f"{where}: P keeps a direction of this covariance with eigenvalue {largest:.4g}, "
            f"which exceeds nullspace_threshold {threshold:g} (a projector of other stats, or "
            "of another threshold)"
        )
    return rank


def largest_kept_eigenvalue(p: torch.Tensor, c: torch.Tensor, iterations: int = 30) -> float:
    """A lower bound (tight after a few iterations) of the largest eigenvalue of P C P, i.e.
    of C on the directions P keeps, by block power iteration (8 vectors): only products of
    (d, d) matrices with (d, 8) blocks, far cheaper than the SVD the import avoids."""
    block = torch.randn(p.shape[0], _PROBES, generator=torch.Generator().manual_seed(1))
    block = torch.linalg.qr(p @ block.to(p)).Q
    for _ in range(iterations):
        block = torch.linalg.qr(p @ (c @ (p @ block))).Q
    rayleigh = block.T @ (p @ (c @ (p @ block)))
    return float(torch.linalg.eigvalsh((rayleigh + rayleigh.T) / 2).max())


def import_null_space_projector(
    path: Path,
    stats_dir: Where,
    model_dir: str | Path,
    *,
    layers: list[int],
    nullspace_threshold: float,
) -> dict[int, tuple[Location, int]]:
    """Check the projectors of `path` (stacked in the order of `layers`, AlphaEdit's
    hparams order) against the covariance in `stats_dir` and cache them there for AlphaEdit
    campaigns with this `nullspace_threshold`. Returns layer -> (entry written, rank)."""
    if len(set(layers)) != len(layers):
        raise StatsStoreError(f"{path}: layers {layers} name a layer twice")
    stack = read_projector_file(path)
    if stack.shape[0] != len(layers):
        raise StatsStoreError(
            f"{path}: holds {stack.shape[0]} projector(s), but {len(layers)} layer(s) "
            f"{layers} were given (list AlphaEdit's layers in its hparams order)"
        )
    model_type = AutoConfig.from_pretrained(model_dir, local_files_only=True).model_type
    moments = load_stats(
        stats_dir,
        layers=sorted(set(layers)),
        model_dir=model_dir,
        module_tmp=module_names_for_type(model_type).rewrite_module_tmp,
        dtype=torch.float32,  # as a campaign loads them (the cache key hashes these bytes)
    )
    # the cache key reads the threshold alone (ALPHAEDIT.derive_key)
    config = AlphaEditConfig.model_construct(nullspace_threshold=nullspace_threshold)
    sha = file_sha256(path)
    written: dict[int, tuple[Location, int]] = {}
    checked = {}
    for index, layer in enumerate(layers):
        where = f"{path} [{index}] (layer {layer})"
        rank = check_projector(where, stack[index], moments[layer], nullspace_threshold)
        checked[layer] = (stack[index].to(torch.float32).contiguous(), rank)
    for index, layer in enumerate(layers):  # nothing is written unless every layer checks out
        projector, rank = checked[layer]
        key = derived_key(ALPHAEDIT, config, layer, moments[layer])
        entry = derived_path(stats_dir, key)
        provenance = {"file": str(path), "sha256": sha, "index": index, "rank": rank,
                      "nullspace_threshold": nullspace_threshold,
                      "format": "AlphaEdit null-space projector (torch.save)"}  # fmt: skip
        write_derived(entry, key, {PROJECTOR: projector}, provenance)
        written[layer] = (entry, rank)
    return written
