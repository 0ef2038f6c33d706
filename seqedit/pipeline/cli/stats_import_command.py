"""`seqedit stats import`: the reference code's .npz second-moment caches as our stats, and
AlphaEdit's saved null-space projectors as the derived tensors of those stats."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from seqedit.pipeline.cli.handlers import CliError, _layers


def add_stats_import_parser(stats: Any) -> None:
    """The `stats import` subcommand."""
    parser = stats.add_parser(
        "import",
        help="read the .npz caches of the original ROME/MEMIT/AlphaEdit/EasyEdit code",
    )
    parser.add_argument(
        "files", nargs="*", type=Path,
        help="<module>_float32_mom2_<n>.npz files, one per layer (none: --out holds the "
        "stats already and only --projector is imported)",
    )  # fmt: skip
    parser.add_argument("--model", required=True, type=Path, help="HF model directory")
    parser.add_argument(
        "--layers", type=_layers, default=None, help="the layers the files must cover, e.g. 1,2"
    )
    parser.add_argument("--out", required=True, help="stats directory to write")
    parser.add_argument(
        "--projector", type=Path, default=None,
        help="AlphaEdit's saved null-space projectors (null_space_project.pt, a tensor "
        "(n_layers, d_in, d_in)), checked against the stats and cached for AlphaEdit",
    )  # fmt: skip
    parser.add_argument(
        "--projector-layers", type=_layers, default=None,
        help="the layers of --projector's stack, in AlphaEdit's hparams order "
        "(default: --layers, or the files' layers, ascending)",
    )  # fmt: skip
    parser.add_argument(
        "--nullspace-threshold", type=float, default=None,
        help="the nullspace_threshold --projector was computed with (default: AlphaEdit's "
        f"{AlphaEditDefaults.threshold:g}); campaigns with this threshold use it",
    )  # fmt: skip
    parser.set_defaults(func=cmd_stats_import)


class AlphaEditDefaults:
    """AlphaEdit's default threshold, without importing torch for `--help`."""

    threshold = 2e-2


def cmd_stats_import(args: argparse.Namespace) -> None:
    from seqedit.workers.stats_import import import_reference_stats
    from seqedit.workers.stats_store import save_stats

    missing = [str(p) for p in [*args.files, args.projector] if p is not None and not p.is_file()]
    if missing:
        raise CliError(f"no such file: {', '.join(missing)}")
    if not args.files and args.projector is None:
        raise CliError("nothing to import: give .npz caches, --projector, or both")
    layers = args.layers
    if args.files:
        result = import_reference_stats(list(args.files), args.model, args.layers)
        save_stats(args.out, result)
        layers = result.meta.layers
        info = result.meta.imported_from or {}
        counts = ", ".join(f"layer {k}: {v} tokens" for k, v in info["token_counts"].items())
        datasets = ", ".join(info.get("datasets", [])) or "unknown"
        print(f"imported {len(args.files)} cache(s) ({counts}; dataset {datasets}) -> {args.out}")
    if args.projector is not None:
        _import_projector(args, args.projector_layers or layers)


def _import_projector(args: argparse.Namespace, layers: list[int] | None) -> None:
    from seqedit.workers.projector_import import import_null_space_projector

    if layers is None:
        raise CliError("--projector without .npz files needs --projector-layers (or --layers)")
    threshold = args.nullspace_threshold
    threshold = AlphaEditDefaults.threshold if threshold is None else threshold
    written = import_null_space_projector(
        args.projector, args.out, args.model, layers=layers, nullspace_threshold=threshold
    )
    ranks = ", ".join(f"layer {layer}: rank {rank}" for layer, (_, rank) in written.items())
    print(f"imported the null-space projectors of {args.projector} ({ranks}) for AlphaEdit "
          f"with nullspace_threshold {threshold:g} -> {args.out}/derived")  # fmt: skip
