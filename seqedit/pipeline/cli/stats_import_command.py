"""`seqedit stats import`: the reference code's .npz second-moment caches as our stats."""

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
        "files", nargs="+", type=Path,
        help="<module>_float32_mom2_<n>.npz files, one per layer",
    )  # fmt: skip
    parser.add_argument("--model", required=True, type=Path, help="HF model directory")
    parser.add_argument(
        "--layers", type=_layers, default=None, help="the layers the files must cover, e.g. 1,2"
    )
    parser.add_argument("--out", required=True, help="stats directory to write")
    parser.set_defaults(func=cmd_stats_import)


def cmd_stats_import(args: argparse.Namespace) -> None:
    from seqedit.workers.stats_import import import_reference_stats
    from seqedit.workers.stats_store import save_stats

    missing = [str(p) for p in args.files if not p.is_file()]
    if missing:
        raise CliError(f"no such file: {', '.join(missing)}")
    result = import_reference_stats(list(args.files), args.model, args.layers)
    save_stats(args.out, result)
    info = result.meta.imported_from or {}
    counts = ", ".join(f"layer {k}: {v} tokens" for k, v in info.get("token_counts", {}).items())
    datasets = ", ".join(info.get("datasets", [])) or "unknown"
    print(f"imported {len(args.files)} cache(s) ({counts}; dataset {datasets}) -> {args.out}")
