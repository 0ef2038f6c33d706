"""Cache of tensors a method derives from one layer's covariance (C^-1, null-space bases).

They cost an SVD or an inverse of a (d_in, d_in) matrix per layer, at every campaign start
(minutes for a 7B model). They depend only on the covariance C itself (keyed by the sha256
of its bytes, so a new stats file never meets an old basis), the layer, the method (and
its version) and the config fields the method names in `derive_key`, so they are cached
next to the stats they come from:

    <stats_dir>/derived/<method>-layer<L>-<key hash>.safetensors

Safetensors metadata `derived_key` holds the key (JSON) and `tensors_sha256` the checksum.
A file whose key or checksum does not match is refused, naming the file and the field,
never silently reused. A read-only stats directory just means no caching. The stats
directory may be a local path or any storage URI (`s3://bucket/stats?...`): the cache is
read and written through `seqedit.storage`.
"""

from __future__ import annotations

import hashlib
import json
import logging
from typing import Any

import torch
from safetensors import SafetensorError

from seqedit.methods.arch import ModuleNames
from seqedit.methods.method import Derived, EditMethod
from seqedit.schemas.campaign import SpecError
from seqedit.storage import Location, Where, location
from seqedit.workers.stats import StatsStoreError
from seqedit.workers.stats_store import load_stats, tensors_sha256
from seqedit.workers.tensor_files import read_safetensors, write_safetensors

log = logging.getLogger(__name__)

DERIVED_DIR = "derived"


def derived_key(
    method: EditMethod, config: Any, layer: int, second_moment: torch.Tensor
) -> dict[str, Any]:
    """Everything a derived tensor of `layer` depends on, C by the sha256 of its bytes."""
    return {
        "method": method.name,
        "method_version": method.version,
        "layer": layer,
        "covariance_sha256": tensors_sha256({"C": second_moment}),
        "config": method.derive_key(config),
    }


def derived_path(stats_dir: Where, key: dict[str, Any]) -> Location:
    """Where the tensors of `key` are cached (under a local or remote stats directory)."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    name = f"{key['method']}-layer{key['layer']}-{digest}.safetensors"
    return location(stats_dir) / DERIVED_DIR / name


def _load(path: Location, key: dict[str, Any]) -> dict[str, torch.Tensor]:
    fix = f"delete {path} to recompute it"
    try:
        tensors, metadata = read_safetensors(path)
    except (SafetensorError, OSError, ValueError) as exc:
        raise StatsStoreError(f"{path}: unreadable derived-tensor cache ({exc}); {fix}") from exc
    stored = json.loads(metadata.get("derived_key", "null"))
    if stored != key:
        raise StatsStoreError(f"{path}: field derived_key is {stored}, expected {key}; {fix}")
    if metadata.get("tensors_sha256") != tensors_sha256(tensors):
        raise StatsStoreError(f"{path}: field tensors_sha256 does not match the tensors; {fix}")
    return tensors


def write_derived(
    path: Location,
    key: dict[str, Any],
    tensors: dict[str, torch.Tensor],
    provenance: dict[str, Any] | None = None,
) -> None:
    """Write the cache entry of `key` at `path` (OSError when it cannot be written);
    `provenance` (JSON) goes into the metadata field `imported_from`."""
    metadata = {
        "derived_key": json.dumps(key, sort_keys=True),
        "tensors_sha256": tensors_sha256(tensors),
    }
    if provenance is not None:
        metadata["imported_from"] = json.dumps(provenance, sort_keys=True)
    path.parent.mkdir()
    write_safetensors(path, tensors, metadata)


def _save(path: Location, key: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    try:
        write_derived(path, key, tensors)
    except OSError as exc:  # a read-only stats directory (StorageError is an OSError)
        log.warning("not caching derived tensors at %s: %s", path, exc)


def derived_tensors(
    method: EditMethod,
    config: Any,
    second_moments: dict[int, torch.Tensor],
    *,
    stats_dir: Where,
) -> tuple[Derived, dict[str, int]]:
    """Layer -> the method's derived tensors, loaded from the cache under `stats_dir` (a
    local path or a storage URI) or computed and cached there.

    Returns (derived, counts) with counts {"loaded": n, "computed": m} (layers). Tensors
    come back on the device and in the dtype of each layer's C.
    """
    if method.derive is None:
        return {}, {"loaded": 0, "computed": 0}
    derived: Derived = {}
    counts = {"loaded": 0, "computed": 0}
    for layer, moment in sorted(second_moments.items()):
        key = derived_key(method, config, layer, moment)
        path = derived_path(stats_dir, key)
        if path.is_file():
            tensors = _load(path, key)
            derived[layer] = {
                name: t.to(device=moment.device, dtype=moment.dtype) for name, t in tensors.items()
            }
            counts["loaded"] += 1
            continue
        # contiguous, as a loaded file is: LAPACK returns column-major results, and a
        # matmul with another memory layout can round differently (not bit-identical)
        derived[layer] = {n: t.contiguous() for n, t in method.derive(config, moment).items()}
        _save(path, key, derived[layer])
        counts["computed"] += 1
    return derived, counts


def method_statistics(
    method: EditMethod,
    config: Any,
    names: ModuleNames,
    *,
    model_dir: str | None,
    stats_dir: Where | None,
) -> tuple[dict[int, torch.Tensor] | None, Derived | None, dict[str, int]]:
    """What a method with this config needs from the stats directory: the second moments C
    (layer -> (d_in, d_in) float32) of its layers, the tensors it derives from them, and the
    derived-cache counts. (None, None, zero counts) when the method uses no covariance."""
    counts = {"loaded": 0, "computed": 0}
    if not method.uses_second_moment(config):
        return None, None, counts
    if stats_dir is None:
        raise SpecError(
            f"method {method.name!r} with these hparams needs covariance stats: "
            "set `stats:` in the campaign (build them with `seqedit stats build`)"
        )
    second_moments = load_stats(
        stats_dir,  # a local path or a storage URI
        model_dir=model_dir,
        layers=method.layers(config),
        module_tmp=names.rewrite_module_tmp,
        dtype=torch.float32,
    )
    derived, counts = derived_tensors(method, config, second_moments, stats_dir=stats_dir)
    return second_moments, derived, counts
