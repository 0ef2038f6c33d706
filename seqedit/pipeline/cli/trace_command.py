"""`seqedit trace`: causal tracing of the facts a model knows, to choose the layer to edit.

Reads requests (any format `load_requests` knows), traces those the model knows
(`methods.tracing`), writes the heatmaps to `--out` and the `TraceResult` as JSON beside
it (same stem, `.json`), and prints the best layers. Heavy imports (torch, the model) wait
until the command runs, so `seqedit --help` stays fast.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from seqedit.pipeline.cli.handlers import CliError

if TYPE_CHECKING:
    from seqedit.methods.trace_rows import TraceResult, TraceSettings


def cmd_trace(args: argparse.Namespace) -> None:
    from seqedit.methods.trace_rows import TraceSettings

    settings = TraceSettings(samples=args.samples, noise=args.noise, window=args.window,
                             seed=args.seed)  # fmt: skip
    result = trace_model(
        args.model, args.requests, args.out, settings=settings, format=args.format,
        limit=args.limit, device=args.device, progress=not args.quiet,
    )  # fmt: skip
    print(best_layers_table(result))
    skipped = len(result.skipped_unknown) + len(result.skipped_no_target)
    print(
        f"traced {result.n_traced} of {result.n_records} records ({skipped} skipped: "
        f"{len(result.skipped_unknown)} not known by the model, {len(result.skipped_no_target)} "
        f"without target_true); mean P(target) clean {result.p_clean:.3f}, "
        f"corrupted {result.p_corrupt:.3f}"
    )
    print(f"heatmaps -> {args.out}; result -> {result_path(args.out)}")


def result_path(out: Path) -> Path:
    """Where the JSON result of a trace whose heatmap goes to `out` is written."""
    return out.with_suffix(".json")


def trace_model(
    model_dir: Path,
    requests_file: Path,
    out: Path,
    *,
    settings: TraceSettings,
    format: str = "auto",
    limit: int | None = None,
    device: str = "cpu",
    progress: bool = True,
) -> TraceResult:
    """Trace the facts of `requests_file` that the model in `model_dir` knows; write the
    heatmap PNG to `out` and the result JSON beside it."""
    from tqdm import tqdm

    from seqedit.files import write_text_atomic
    from seqedit.methods.tracing import TraceError, trace_facts
    from seqedit.pipeline.results.trace_plot import plot_trace
    from seqedit.schemas.loaders import load_requests
    from seqedit.workers.model_io import load_model

    if out.suffix.lower() != ".png":
        raise CliError(f"--out {out}: give a .png path (the result JSON goes beside it)")
    requests = load_requests(requests_file, format, limit=limit).requests
    model, tokenizer = load_model(model_dir, device=device)
    bar: tqdm | None = None

    def on_record(done: int, total: int) -> None:  # the total is known after the first fact
        nonlocal bar
        bar = bar or tqdm(total=total, desc="tracing", unit="fact")
        bar.update(done - bar.n)

    try:
        name = f"{model_dir.name} ({model.config.model_type})"
        result = trace_facts(model, tokenizer, requests, settings, model_name=name,
                             progress=on_record if progress else None)  # fmt: skip
    except TraceError as exc:
        raise TraceError(f"{requests_file}: {exc}") from exc
    finally:
        if bar is not None:
            bar.close()
    plot_trace(result, out)
    write_text_atomic(result_path(out), result.model_dump_json(indent=1) + "\n")
    return result


def best_layers_table(result: TraceResult) -> str:
    """The best layer of each kind at the last subject token and the last token, with its
    AIE, as an aligned terminal table."""
    import pyarrow as pa

    from seqedit.methods.trace_rows import KINDS, LAST_SUBJECT_ROW, LAST_TOKEN_ROW
    from seqedit.pipeline.results.tables_format import format_table

    rows = []
    for kind in KINDS:
        best, aie = result.best_layers[kind], result.aie[kind]
        subject, last = aie[LAST_SUBJECT_ROW], aie[LAST_TOKEN_ROW]
        assert subject is not None and last is not None  # every traced fact has both rows
        rows.append({
            "restored": kind,
            "layer@last_subject": best.last_subject, "AIE@last_subject": subject[best.last_subject],
            "layer@last_token": best.last_token, "AIE@last_token": last[best.last_token],
        })  # fmt: skip
    return format_table(pa.Table.from_pylist(rows))
