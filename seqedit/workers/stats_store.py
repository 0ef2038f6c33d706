"""The stored second-moment statistics, with provenance checked on every load.

A stats directory is a local path or any storage URI (``s3://bucket/stats?...``; see
:mod:`seqedit.storage`), read and written only through :class:`seqedit.storage.Location`.
Its layout (both files written atomically: a local temp file renamed over the target, or
one object put whole on an object store):

``stats.safetensors``
    per layer L, with ``M = module_tmp.format(L)`` (e.g. ``transformer.h.1.mlp.c_proj``):
    ``M.mom2_sum``: (d_in, d_in) float32/float64 sum of k kᵀ over non-pad tokens;
    ``M.count``: int64 scalar, number of tokens summed.
    Safetensors metadata: ``seqedit_stats`` = the :class:`StatsMeta` JSON (without
    ``sha256``), ``tensors_sha256`` = sha256 of the tensors (names, dtypes, shapes, bytes;
    makes the file self-verifying) and ``count`` = the token count (as in the golden set).
``stats.json``
    the same :class:`StatsMeta` plus ``sha256`` of ``stats.safetensors``.

C = mom2_sum / count is formed at load time.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import torch
from pydantic import ValidationError
from safetensors import safe_open
from safetensors.torch import save_file

from seqedit.files import file_sha256
from seqedit.methods.covariance import GPT2_REWRITE_MODULE_TMP, SecondMomentAccumulator
from seqedit.storage import Location, Where, location
from seqedit.workers.model_io import model_fingerprint
from seqedit.workers.stats import (
    FORMAT_VERSION,
    META_FILE,
    STATS_FILE,
    StatsMeta,
    StatsResult,
    StatsStoreError,
)

log = logging.getLogger(__name__)


def tensors_sha256(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over the names, dtypes, shapes and bytes of ``tensors`` (sorted by name)."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _write_hashed(
    target: Location, tensors: dict[str, torch.Tensor], metadata: dict[str, str]
) -> str:
    """Write a safetensors file at ``target`` (atomically) and return the sha256 of the
    bytes stored there, hashed from the staged file (no download of a remote one)."""
    digest: list[str] = []

    def write(tmp: Path) -> None:
        save_file(tensors, str(tmp), metadata=metadata)
        digest.append(file_sha256(tmp))

    target.write_with(write)
    return digest[-1]


def save_stats(out_dir: Where, result: StatsResult) -> Location:
    """Write ``stats.safetensors`` then ``stats.json`` into ``out_dir`` (a local path or a
    storage URI); returns its location."""
    out = location(out_dir)
    out.mkdir()
    meta = result.meta.model_copy(update={"sha256": None})
    tensors: dict[str, torch.Tensor] = {}
    for layer, acc in sorted(result.accumulators.items()):
        name = meta.module_names[layer]
        if acc.sum is None:
            raise ValueError(f"layer {layer}: empty accumulator, nothing to save")
        tensors[f"{name}.mom2_sum"] = acc.sum.detach().cpu().contiguous()
        tensors[f"{name}.count"] = torch.tensor(acc.count, dtype=torch.int64)
    metadata = {
        "seqedit_stats": meta.json_text(),
        "tensors_sha256": tensors_sha256(tensors),
        "count": str(meta.token_count),
    }
    sha256 = _write_hashed(out / STATS_FILE, tensors, metadata)
    sidecar = meta.model_copy(update={"sha256": sha256})
    (out / META_FILE).write_text(sidecar.json_text(indent=1) + "\n")
    log.info("saved stats of layers %s to %s", sorted(result.accumulators), out)
    return out


def load_accumulators(stats_dir: Where, *, verify_hash: bool = True) -> StatsResult:
    """Read a stats directory (a local path or a storage URI) back into accumulators,
    refusing a corrupt or altered file; errors name the file (``str`` of its location)."""
    root = location(stats_dir)
    path = root / STATS_FILE
    if not path.is_file():
        raise StatsStoreError(f"{path}: stats file not found")
    sidecar_path = root / META_FILE
    has_sidecar = sidecar_path.is_file()
    file_hash: str | None = None
    with path.local_copy() as local:  # safe_open needs a local file: remote ones download
        try:
            with safe_open(str(local), framework="pt") as handle:
                metadata = handle.metadata() or {}
                embedded = StatsMeta.model_validate_json(metadata["seqedit_stats"])
                raw = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
        except (KeyError, ValidationError) as exc:
            raise StatsStoreError(f"{path}: missing or invalid provenance metadata: {exc}") from exc
        except Exception as exc:  # safetensors raises its own error type for bad files
            raise StatsStoreError(f"{path}: corrupt or truncated safetensors file: {exc}") from exc
        if verify_hash and has_sidecar:  # the bytes read above: streamed from a local
            file_hash = file_sha256(local)  # file, the one download of a remote one
    if embedded.format_version != FORMAT_VERSION:
        raise StatsStoreError(f"{path}: format_version {embedded.format_version} unsupported")
    if verify_hash and metadata.get("tensors_sha256") != tensors_sha256(raw):
        raise StatsStoreError(f"{path}: tensors_sha256: tensor data corrupt or altered")
    if has_sidecar:
        try:
            sidecar = StatsMeta.model_validate_json(sidecar_path.read_text(encoding="utf-8"))
        except (ValidationError, OSError) as exc:
            raise StatsStoreError(f"{sidecar_path}: invalid stats metadata: {exc}") from exc
        if sidecar.model_copy(update={"sha256": None}) != embedded:
            raise StatsStoreError(f"{sidecar_path}: does not describe {path} (metadata differ)")
        if verify_hash and sidecar.sha256 != file_hash:
            raise StatsStoreError(
                f"{path}: sha256 differs from {sidecar_path} (file changed or corrupt)"
            )
    else:
        log.warning("%s missing; using the metadata embedded in %s", sidecar_path, path)
    accs: dict[int, SecondMomentAccumulator] = {}
    for layer, name in embedded.module_names.items():
        try:
            mom2, count = raw[f"{name}.mom2_sum"], int(raw[f"{name}.count"].item())
            accs[layer] = SecondMomentAccumulator.from_state(mom2, count)
        except (KeyError, ValueError) as exc:
            raise StatsStoreError(f"{path}: layer {layer} ({name}): bad tensors: {exc}") from exc
        if count <= 0 or not bool(torch.isfinite(mom2).all()):
            raise StatsStoreError(f"{path}: layer {layer} ({name}): empty or non-finite sum")
    return StatsResult(accumulators=accs, meta=embedded)


def load_stats(
    stats_dir: Where,
    *,
    layers: list[int],
    model_dir: str | Path | None = None,
    expected_fingerprint: str | None = None,
    module_tmp: str = GPT2_REWRITE_MODULE_TMP,
    dtype: torch.dtype | None = None,
    verify_hash: bool = True,
) -> dict[int, torch.Tensor]:
    """Layer -> C = mom2_sum / count (d_in, d_in) of the stats in ``stats_dir`` (a local
    path or a storage URI), after checking provenance.

    The model fingerprint is checked against ``expected_fingerprint`` or, if given, the
    fingerprint of ``model_dir``; each layer must be stored for ``module_tmp.format(L)``.
    ``dtype``: cast of the returned moments (default: the stored accumulation dtype).
    Raises :class:`StatsStoreError` naming the file and the mismatching field.
    """
    path = location(stats_dir) / STATS_FILE
    result = load_accumulators(stats_dir, verify_hash=verify_hash)
    meta = result.meta
    if model_dir is not None:
        expected = model_fingerprint(model_dir)
        if expected_fingerprint is not None and expected != expected_fingerprint:
            raise ValueError("model_dir and expected_fingerprint disagree")
        expected_fingerprint = expected
    if expected_fingerprint is not None and meta.model_fingerprint != expected_fingerprint:
        raise StatsStoreError(
            f"{path}: model_fingerprint mismatch: stored {meta.model_fingerprint} (from "
            f"{meta.model_dir}), expected {expected_fingerprint}"
        )
    out: dict[int, torch.Tensor] = {}
    for layer in layers:
        if layer not in meta.module_names:
            raise StatsStoreError(
                f"{path}: layers: layer {layer} not stored (stored: {sorted(meta.module_names)})"
            )
        if meta.module_names[layer] != module_tmp.format(layer):
            raise StatsStoreError(
                f"{path}: module_names: layer {layer} stored for "
                f"{meta.module_names[layer]!r}, expected "
                f"{module_tmp.format(layer)!r}"
            )
        moment = result.accumulators[layer].moment()
        out[layer] = moment if dtype is None else moment.to(dtype)
    return out
