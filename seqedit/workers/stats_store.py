"""The on-disk store of second-moment statistics, with provenance checked on every load.

Layout of a stats directory (both files written atomically, tmp + ``os.replace``):

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

from seqedit.files import file_sha256, write_text_atomic
from seqedit.methods.covariance import GPT2_REWRITE_MODULE_TMP, SecondMomentAccumulator
from seqedit.workers.model_io import model_fingerprint
from seqedit.workers.stats import (
    FORMAT_VERSION,
    META_FILE,
    STATS_FILE,
    StatsMeta,
    StatsResult,
    StatsStoreError,
)
from seqedit.workers.tensor_files import write_safetensors

log = logging.getLogger(__name__)


def tensors_sha256(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over the names, dtypes, shapes and bytes of ``tensors`` (sorted by name)."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def save_stats(out_dir: str | Path, result: StatsResult) -> Path:
    """Write ``stats.safetensors`` then ``stats.json`` into ``out_dir``; returns the dir."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    meta = result.meta.model_copy(update={"sha256": None})
    tensors: dict[str, torch.Tensor] = {}
    for layer, acc in sorted(result.accumulators.items()):
        name = meta.module_names[layer]
        if acc.sum is None:
            raise ValueError(f"layer {layer}: empty accumulator, nothing to save")
        tensors[f"{name}.mom2_sum"] = acc.sum.detach().cpu().contiguous()
        tensors[f"{name}.count"] = torch.tensor(acc.count, dtype=torch.int64)
    metadata = {
        "seqedit_stats": meta.model_dump_json(),
        "tensors_sha256": tensors_sha256(tensors),
        "count": str(meta.token_count),
    }
    write_safetensors(out / STATS_FILE, tensors, metadata)
    sidecar = meta.model_copy(update={"sha256": file_sha256(out / STATS_FILE)})
    write_text_atomic(out / META_FILE, sidecar.model_dump_json(indent=1) + "\n")
    log.info("saved stats of layers %s to %s", sorted(result.accumulators), out)
    return out


def load_accumulators(stats_dir: str | Path, *, verify_hash: bool = True) -> StatsResult:
    """Read a stats directory back into accumulators, refusing a corrupt or altered file."""
    path = Path(stats_dir) / STATS_FILE
    if not path.is_file():
        raise StatsStoreError(f"{path}: stats file not found")
    sidecar_path = Path(stats_dir) / META_FILE
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            embedded = StatsMeta.model_validate_json(metadata["seqedit_stats"])
            raw = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
    except (KeyError, ValidationError) as exc:
        raise StatsStoreError(f"{path}: missing or invalid provenance metadata: {exc}") from exc
    except Exception as exc:  # safetensors raises its own error type for bad files
        raise StatsStoreError(f"{path}: corrupt or truncated safetensors file: {exc}") from exc
    if embedded.format_version != FORMAT_VERSION:
        raise StatsStoreError(f"{path}: format_version {embedded.format_version} unsupported")
    if verify_hash and metadata.get("tensors_sha256") != tensors_sha256(raw):
        raise StatsStoreError(f"{path}: tensors_sha256: tensor data corrupt or altered")
    if sidecar_path.is_file():
        try:
            sidecar = StatsMeta.model_validate_json(sidecar_path.read_text(encoding="utf-8"))
        except (ValidationError, OSError) as exc:
            raise StatsStoreError(f"{sidecar_path}: invalid stats metadata: {exc}") from exc
        if sidecar.model_copy(update={"sha256": None}) != embedded:
            raise StatsStoreError(f"{sidecar_path}: does not describe {path} (metadata differ)")
        if verify_hash and sidecar.sha256 != file_sha256(path):
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
    stats_dir: str | Path,
    *,
    layers: list[int],
    model_dir: str | Path | None = None,
    expected_fingerprint: str | None = None,
    module_tmp: str = GPT2_REWRITE_MODULE_TMP,
    dtype: torch.dtype | None = None,
    verify_hash: bool = True,
) -> dict[int, torch.Tensor]:
    """Layer -> C = mom2_sum / count (d_in, d_in), after checking provenance.

    The model fingerprint is checked against ``expected_fingerprint`` or, if given, the
    fingerprint of ``model_dir``; each layer must be stored for ``module_tmp.format(L)``.
    ``dtype``: cast of the returned moments (default: the stored accumulation dtype).
    Raises :class:`StatsStoreError` naming the file and the mismatching field.
    """
    path = Path(stats_dir) / STATS_FILE
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
