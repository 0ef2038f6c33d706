"""Importing the second-moment caches of the original ROME/MEMIT/AlphaEdit/EasyEdit code.

That code (`rome/layer_stats.py`, `util/runningstats.py`) keeps one `.npz` per module at
    <stats_dir>/<model>/<dataset>_stats/<module>_<precision>_mom2[_t<tokens>]_<n>.npz
holding `mom2.mom2` (the sum of k k^T over the tokens, (d_in, d_in)), `mom2.count` (the
token count), `mom2.constructor` and `constructor` (the classes that wrote it) and
`sample_size` (the documents sampled, n; None for all of them). `import_reference_stats`
reads such files (never with pickle), checks each against the model's module of that name,
and returns our `StatsResult`, with the provenance that can be known: every source file's
sha256, the sample count and the dataset name from the path. Anything else is refused, with
the file's name and what is wrong.
"""

from __future__ import annotations

import hashlib
import re
import zipfile
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch

from seqedit import __version__
from seqedit.files import file_sha256
from seqedit.methods.arch import module_names_for, module_weight
from seqedit.methods.covariance import SecondMomentAccumulator
from seqedit.workers.model_io import load_model, model_fingerprint
from seqedit.workers.stats import StatsMeta, StatsResult, StatsStoreError

FILE_NAME = re.compile(
    r"^(?P<module>.+)_(?P<precision>float16|float32|float64)_mom2(?:_t\d+)?(?:_(?P<n>\d+))?\.npz$"
)
"""`<module>_<precision>_mom2[_t<batch tokens>][_<sample size>].npz` (layer_stats's names)."""

REQUIRED_KEYS = ("mom2.mom2", "mom2.count")


def dataset_of(path: Path) -> str | None:
    """The dataset a cache was computed on, from its folder `<dataset>_stats` (or None)."""
    folder = path.parent.name
    return folder[: -len("_stats")] if folder.endswith("_stats") else None


def read_reference_npz(path: Path) -> tuple[str, torch.Tensor, int, int | None]:
    """(module name, mom2 sum (d_in, d_in) as stored, token count, sample size or None) of
    one reference cache file; `StatsStoreError` naming the file for anything else."""
    match = FILE_NAME.match(path.name)
    if match is None:
        raise StatsStoreError(
            f"{path}: not a reference second-moment cache name "
            "(expected <module>_<precision>_mom2_<n>.npz, e.g. "
            "transformer.h.17.mlp.c_proj_float32_mom2_100000.npz)"
        )
    try:
        data = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise StatsStoreError(f"{path}: not a readable .npz file ({exc})") from exc
    with data:
        missing = [key for key in REQUIRED_KEYS if key not in data.files]
        if missing:
            raise StatsStoreError(
                f"{path}: missing {', '.join(missing)} (keys present: {', '.join(data.files)}): "
                "not a second-moment cache of the reference code"
            )
        try:
            mom2 = np.asarray(data["mom2.mom2"])
            count = int(np.asarray(data["mom2.count"]))
        except (ValueError, TypeError, OSError, zipfile.BadZipFile) as exc:
            raise StatsStoreError(f"{path}: mom2.mom2 / mom2.count unreadable ({exc})") from exc
        sample_size = _optional_int(data, "sample_size")
    if mom2.ndim != 2 or mom2.shape[0] != mom2.shape[1]:
        raise StatsStoreError(f"{path}: mom2.mom2 has shape {mom2.shape}, expected (d_in, d_in)")
    if mom2.dtype not in (np.float32, np.float64):
        raise StatsStoreError(f"{path}: mom2.mom2 is {mom2.dtype}, expected float32 or float64")
    if count <= 0:
        raise StatsStoreError(f"{path}: mom2.count is {count}: no tokens were summed")
    if not np.isfinite(mom2).all():
        raise StatsStoreError(f"{path}: mom2.mom2 holds NaN or infinite values")
    return match["module"], torch.from_numpy(mom2.copy()), count, sample_size


def _optional_int(data: np.lib.npyio.NpzFile, key: str) -> int | None:
    """An integer entry, or None when absent or stored as a null (an object array: the
    reference writes `sample_size=None` that way, which we do not unpickle)."""
    if key not in data.files:
        return None
    try:
        value = np.asarray(data[key])
    except ValueError:  # object array: allow_pickle=False refuses it
        return None
    return int(value) if value.dtype.kind in "iu" else None


def import_reference_stats(
    files: list[Path], model_dir: str | Path, layers: list[int] | None = None
) -> StatsResult:
    """Our stats of `model_dir` from reference caches, one file per rewrite-module layer.

    Each file's module must be the model's rewrite module (MLP output projection) of some
    layer, with d_in matching the module's input width; `layers`, when given, must be the
    layers the files cover. The sums keep their stored dtype (the reference's float32).
    """
    if not files:
        raise StatsStoreError("no cache files given")
    model, _ = load_model(model_dir)
    names = module_names_for(model)
    pattern = re.compile("^" + re.escape(names.rewrite_module_tmp).replace(r"\{\}", r"(\d+)") + "$")
    accumulators: dict[int, SecondMomentAccumulator] = {}
    module_names: dict[int, str] = {}
    samples: set[int | None] = set()
    datasets: set[str | None] = set()
    for path in files:
        module, mom2, count, sample_size = read_reference_npz(path)
        found = pattern.match(module)
        if found is None:
            raise StatsStoreError(
                f"{path}: module {module!r} is not a rewrite module of this model "
                f"({names.rewrite_module_tmp.format('L')})"
            )
        layer = int(found[1])
        if layer >= model.config.num_hidden_layers:
            raise StatsStoreError(
                f"{path}: layer {layer}: the model has {model.config.num_hidden_layers} layers"
            )
        weight, transposed = module_weight(model, module, names.rewrite_weight_transposed)
        d_in = int(weight.shape[0] if transposed else weight.shape[1])
        if mom2.shape[0] != d_in:
            raise StatsStoreError(
                f"{path}: mom2.mom2 is {tuple(mom2.shape)} but {module} takes inputs of width "
                f"{d_in}: a cache of another model"
            )
        if layer in accumulators:
            raise StatsStoreError(f"{path}: a second file for {module}")
        accumulators[layer] = SecondMomentAccumulator.from_state(mom2, count)
        module_names[layer] = module
        samples.add(sample_size)
        datasets.add(dataset_of(path))
    if layers is not None and sorted(layers) != sorted(accumulators):
        raise StatsStoreError(
            f"--layers {sorted(layers)} but the files cover layers {sorted(accumulators)}"
        )
    digest = hashlib.sha256()
    for path in files:
        digest.update(f"{path.name}|{file_sha256(path)}|".encode())
    counts = {acc.count for acc in accumulators.values()}
    dtype = "float64" if any(a.dtype == torch.float64 for a in accumulators.values()) else "float32"
    meta = StatsMeta(
        seqedit_version=__version__,
        created_at=datetime.now(UTC),
        model_fingerprint=model_fingerprint(model_dir),
        model_dir=str(model_dir),
        layers=sorted(accumulators),
        module_names=module_names,
        corpus_files=[str(p) for p in files],
        corpus_fingerprint=digest.hexdigest(),
        n_documents=0,
        n_samples=next(iter(samples)) if len(samples) == 1 else None,
        seed=0,
        max_length=0,
        batch_size=0,
        add_special_tokens=False,
        sort_by_length=False,
        token_count=max(counts),
        dtype=dtype,
        seconds=0.0,
        imported_from={
            "format": "reference npz (rome/layer_stats.py)",
            "files": {str(p): file_sha256(p) for p in files},
            "datasets": sorted(d for d in datasets if d),
            "sample_sizes": sorted(s for s in samples if s is not None),
            "token_counts": {str(layer): acc.count for layer, acc in sorted(accumulators.items())},
        },
    )
    return StatsResult(accumulators=accumulators, meta=meta)
