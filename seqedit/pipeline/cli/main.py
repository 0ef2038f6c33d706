"""The `seqedit` command line. It owns the terminal: progress bars, tables, exit codes."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from seqedit import __version__
from seqedit.errors import SeqeditError
from seqedit.pipeline.cli.handlers import (  # noqa: F401  (CliError: re-exported)
    WHERE_HELP,
    CliError,
    _layers,
    _other_campaign,
    _where,
    cmd_cancel,
    cmd_compact,
    cmd_demo,
    cmd_edit,
    cmd_export,
    cmd_hparams_import,
    cmd_logs,
    cmd_plot,
    cmd_query,
    cmd_rebuild,
    cmd_report,
    cmd_rerun,
    cmd_run,
    cmd_stats_build,
    cmd_stats_ls,
    cmd_status,
    cmd_submit,
    cmd_testbed_build,
    cmd_validate,
)
from seqedit.pipeline.cli.stats_import_command import add_stats_import_parser
from seqedit.pipeline.cli.trace_command import cmd_trace
from seqedit.pipeline.cli.train_command import add_train_parser

if TYPE_CHECKING:
    pass


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="seqedit", description="Sequential knowledge editing of language models on Ray."
    )
    parser.add_argument("--version", action="version", version=f"seqedit {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    testbed = sub.add_parser("testbed", help="the fact testbed model").add_subparsers(
        dest="action", required=True, metavar="ACTION"
    )
    build = testbed.add_parser("build", help="train a tiny model that knows a set of facts")
    build.add_argument("--out", required=True, type=Path, help="model directory to write")
    source = build.add_mutually_exclusive_group(required=True)
    source.add_argument("--dataset", type=Path, help="CounterFact file whose TRUE facts to learn")
    source.add_argument("--synthetic", type=int, metavar="N", help="generate a world of N facts")
    build.add_argument("--limit", type=int, help="with --dataset: first N records")
    build.add_argument("--seed", type=int, default=0)
    build.add_argument(
        "--architecture",
        default="gpt2",
        help="model family: gpt2 (default), gptj, gpt_neox, llama, mistral or qwen2",
    )
    build.add_argument("--split", metavar="TRAIN,VAL,TEST",
                       help="also split the requests by subject into OUT/splits.json, e.g. "
                       "0.8,0.1,0.1 (the model still learns every fact)")  # fmt: skip
    build.add_argument("--split-seed", type=int, default=None,
                       help="seed of the split's subject shuffle (default 0)")  # fmt: skip
    build.add_argument("--english", default="auto", metavar="auto|none|FILE",
                       help="with --dataset: English text learned beside the facts, making "
                       "the testbed a language model; auto (default) finds "
                       "english_wordnet.txt in $SEQEDIT_ENGLISH or ../shared/data; none: "
                       "facts only")  # fmt: skip
    build.add_argument("--quiet", action="store_true", help="no progress bar")
    build.set_defaults(func=cmd_testbed_build)

    stats = sub.add_parser("stats", help="covariance (second moment) statistics").add_subparsers(
        dest="action", required=True, metavar="ACTION"
    )
    sbuild = stats.add_parser("build", help="second moments of the rewrite modules' inputs")
    sbuild.add_argument("--model", required=True, type=Path, help="HF model directory")
    sbuild.add_argument("--layers", required=True, type=_layers, help="e.g. 1,2")
    sbuild.add_argument("--corpus", required=True, nargs="+",
                        help="text, JSONL or Parquet files (paths or pyarrow URIs), or a "
                        "Hugging Face dataset saved on disk")  # fmt: skip
    sbuild.add_argument("--text-column", default="text", help="JSONL/Parquet/dataset column")
    sbuild.add_argument("--samples", type=int, default=None,
                        help="a seeded sample of N documents (default: all)")  # fmt: skip
    sbuild.add_argument("--seed", type=int, default=0, help="seed of --samples")
    sbuild.add_argument("--shards", type=int, default=1,
                        help=">1: sharded on Ray actors, resumable (OUT/shards)")  # fmt: skip
    sbuild.add_argument("--actors", type=int, default=2, help="actors for --shards > 1")
    sbuild.add_argument("--cpus-per-actor", type=float, default=1)
    sbuild.add_argument("--gpus-per-actor", type=float, default=0)
    sbuild.add_argument("--out", required=True, type=_where,
                        help="stats directory to write: a path or a storage URI "
                        "(s3://bucket/stats?endpoint_override=...)")  # fmt: skip
    sbuild.add_argument("--batch-size", type=int, default=32)
    sbuild.add_argument("--max-length", type=int, default=None, help="default: model context")
    sbuild.add_argument("--dtype", choices=["float32", "float64"], default="float64")
    sbuild.add_argument("--until-stable", type=float, default=None, metavar="EPS",
                        help="stop once C^-1 k (and P k) of the probe requests' keys change "
                        "by less than EPS (relative) from one shard to the next; needs "
                        "--shards > 1 (the chunks) and --probe-requests")  # fmt: skip
    sbuild.add_argument("--probe-requests", type=Path, default=None,
                        help="edit requests whose keys --until-stable watches")  # fmt: skip
    sbuild.add_argument("--probes", type=int, default=64,
                        help="how many of them (evenly spaced)")  # fmt: skip
    sbuild.add_argument("--nullspace-threshold", type=float, default=None,
                        help="--until-stable also watches AlphaEdit's P k at this "
                        "nullspace_threshold")  # fmt: skip
    sbuild.add_argument("--quiet", action="store_true")
    sbuild.set_defaults(func=cmd_stats_build)
    add_stats_import_parser(stats)
    sls = stats.add_parser("ls", help="the stats directories under ROOT, checked")
    sls.add_argument("root", type=_where,
                     help="a folder of stats directories: a path or a storage URI")  # fmt: skip
    sls.add_argument("--format", choices=["table", "csv", "json"], default="table")
    sls.set_defaults(func=cmd_stats_ls)

    run = sub.add_parser("run", help="run a campaign spec locally (embedded Ray)")
    run.add_argument("spec", type=Path, help="campaign YAML")
    run.add_argument("--out", required=True, type=_where, help=WHERE_HELP)
    run.add_argument("--quiet", action="store_true")
    run.set_defaults(func=cmd_run)

    submit = sub.add_parser(
        "submit", help="submit a campaign to a Ray cluster as a job (no --address: run here)"
    )
    submit.add_argument("spec", type=Path, help="campaign YAML (on storage every node sees)")
    submit.add_argument(
        "--out",
        required=True,
        type=_where,
        help="campaign directory every node reaches: a shared path or a URI",
    )
    submit.add_argument("--address", default=None,
                        help="a job server (http://HEAD:8265: submitted as a Ray job), or "
                        "auto / ray://HEAD:10001 / HEAD:6379 (the driver runs here, its "
                        "actors on that cluster); none: run here")  # fmt: skip
    submit.add_argument("--wait", action="store_true", help="follow the job to its end")
    submit.add_argument("--quiet", action="store_true")
    submit.set_defaults(func=cmd_submit)

    logs = sub.add_parser("logs", help="what a submitted campaign's job has printed")
    logs.add_argument("campaign_dir", type=_where, help=WHERE_HELP)
    logs.set_defaults(func=cmd_logs)

    cancel = sub.add_parser("cancel", help="stop a submitted campaign's job")
    cancel.add_argument("campaign_dir", type=_where, help=WHERE_HELP)
    cancel.set_defaults(func=cmd_cancel)

    edit = sub.add_parser("edit", help="edit a model once, in order, and save the deltas")
    edit.add_argument("--model", required=True, type=Path, help="HF model directory")
    edit.add_argument(
        "--method", help="registered method, e.g. rome (default: the hparams file's `method`)"
    )
    edit.add_argument(
        "--hparams",
        required=True,
        type=Path,
        help="YAML/JSON of config fields (or hparams import's)",
    )
    edit.add_argument("--requests", required=True, type=Path, help="requests file (any format)")
    edit.add_argument("--stats", type=Path, default=None, help="covariance stats directory")
    order = edit.add_mutually_exclusive_group()
    order.add_argument("--sequential", action="store_true", help="one edit after another (default)")
    order.add_argument(
        "--batch",
        action="store_true",
        help="all requests as one batched edit (methods with a batched solve)",
    )
    edit.add_argument("--save-deltas", required=True, type=Path, help="OUT.safetensors")
    edit.add_argument("--save-model", type=Path, default=None, help="write the edited model here")
    edit.add_argument("--quiet", action="store_true")
    edit.set_defaults(func=cmd_edit)

    trace = sub.add_parser(
        "trace", help="causal tracing (ROME): where a model recalls its facts, to choose a layer"
    )
    trace.add_argument("--model", required=True, type=Path, help="HF model directory")
    trace.add_argument("--requests", required=True, type=Path, help="requests file (any format)")
    trace.add_argument("--format", default="auto", help="requests format (default: detected)")
    trace.add_argument("--limit", type=int, default=None, help="first N records")
    trace.add_argument("--samples", type=int, default=10, help="noisy copies of each prompt")
    trace.add_argument("--noise", type=float, default=3.0,
                       help="noise std, times the std of the subject embeddings")  # fmt: skip
    trace.add_argument("--window", type=int, default=10,
                       help="MLP/attention layers restored together, at most the model's depth "
                       "(1: single layers, for a few-layer model)")  # fmt: skip
    trace.add_argument("--seed", type=int, default=0, help="seed of the noise")
    trace.add_argument("--device", default="cpu", help="torch device, e.g. cuda:0")
    trace.add_argument("--out", required=True, type=Path,
                       help="heatmap PNG; the result JSON goes beside it (same stem)")  # fmt: skip
    trace.add_argument("--quiet", action="store_true", help="no progress bar")
    trace.set_defaults(func=cmd_trace)

    hparams = sub.add_parser("hparams", help="hyperparameter files").add_subparsers(
        dest="action", required=True, metavar="ACTION"
    )
    himport = hparams.add_parser(
        "import", help="an EasyEdit YAML or reference JSON hparams file, as ours (docs/hparams.md)"
    )
    himport.add_argument("file", type=Path, help="EasyEdit .yaml or reference .json")
    himport.add_argument(
        "--method", default=None, help="our method; needed when the file or its path does not tell"
    )
    himport.add_argument("--out", type=Path, default=None, help="OUT.yaml (default: print)")
    himport.add_argument(
        "--training",
        action="store_true",
        help="a MEND/SERAC file's training fields, as the --config of `seqedit train`",
    )
    himport.set_defaults(func=cmd_hparams_import)

    validate = sub.add_parser("validate", help="check a campaign spec without running it")
    validate.add_argument("spec", type=Path)
    validate.add_argument(
        "--schema-only", action="store_true", help="skip the checks of model, data and stats"
    )
    validate.add_argument(
        "--disk-budget",
        type=float,
        default=None,
        metavar="GB",
        help="warn above this many GB written (default: the spec's disk_budget_gb)",
    )
    validate.set_defaults(func=cmd_validate)

    status = sub.add_parser("status", help="per-shard state of a campaign (also while it runs)")
    status.add_argument("campaign_dir", type=_where, help=WHERE_HELP)
    status.set_defaults(func=cmd_status)

    rerun = sub.add_parser(
        "rerun",
        help="continue a campaign from its last good checkpoint (default: every shard not "
        "done), or rerun chosen shards",
    )
    rerun.add_argument("campaign_dir", type=_where, help=WHERE_HELP)
    which = rerun.add_mutually_exclusive_group()
    which.add_argument(
        "--failed",
        action="store_true",
        help="only the failed shards (and one a killed driver left running)",
    )
    which.add_argument(
        "--shard",
        type=int,
        metavar="K",
        help="only shard K, even if done (shard K-1 must be done); later shards become "
        "pending if K's weights come out different",
    )
    rerun.add_argument("--quiet", action="store_true", help="no progress bar")
    rerun.add_argument("--address", default=None,
                       help="submit the rerun to this cluster's job server")  # fmt: skip
    rerun.add_argument("--wait", action="store_true", help="with --address: follow the job")
    rerun.set_defaults(func=cmd_rerun)

    rebuild = sub.add_parser(
        "rebuild", help="the edited model at any step: base model + edit log, as a model dir"
    )
    rebuild.add_argument("campaign_dir", type=_where, help=WHERE_HELP)
    rebuild.add_argument("--step", type=int, required=True, help="last step applied (0-based)")
    rebuild.add_argument("--out", type=Path, required=True, help="model directory to write")
    rebuild.set_defaults(func=cmd_rebuild)

    export = sub.add_parser(
        "export", help="a campaign's edits up to a step as a PEFT LoRA adapter (load, unload)"
    )
    export.add_argument("campaign_dir", type=_where, help=WHERE_HELP)
    export.add_argument("--step", type=int, required=True, help="last step exported (0-based)")
    export.add_argument("--format", choices=["peft"], default="peft", help="adapter format")
    export.add_argument("--out", type=Path, required=True, help="adapter directory to write")
    export.add_argument(
        "--rank", type=int, default=None,
        help="largest adapter rank; beyond it a module's change is its truncated SVD, with the "
        "relative error reported (default: each module's full rank, exact)",
    )  # fmt: skip
    export.set_defaults(func=cmd_export)

    q = sub.add_parser(
        "query", help="read-only SQL over a campaign's tables, or a training job's (DuckDB)"
    )
    q.add_argument("campaign_dir", type=_where, help=WHERE_HELP)
    q.add_argument("sql", help='e.g. "SELECT count(*) FROM edits"')
    q.add_argument("--format", choices=["table", "csv", "json"], default="table")
    q.add_argument(
        "--with",
        dest="others",
        type=_other_campaign,
        action="append",
        default=[],
        metavar="NAME=DIR",
        help="another campaign, its views as NAME.curves, NAME.evals, ... (repeatable)",
    )
    q.set_defaults(func=cmd_query)

    compact = sub.add_parser(
        "compact", help="merge the parts of each finished shard into one (query results unchanged)"
    )
    compact.add_argument("campaign_dir", type=_where, help=WHERE_HELP)
    compact.set_defaults(func=cmd_compact)

    plot = sub.add_parser("plot", help="PNGs of a campaign's degradation curve and health")
    plot.add_argument("campaign_dir", type=_where, help=WHERE_HELP)
    plot.add_argument(
        "--out", type=_where, default=None, help="default: <campaign>/degradation.png"
    )
    plot.set_defaults(func=cmd_plot)

    report = sub.add_parser(
        "report", help="HTML page with a campaign's plots and summary (optionally compared)"
    )
    report.add_argument("campaign_dir", type=_where, help=WHERE_HELP)
    report.add_argument("--compare", nargs="+", type=_where, default=[], metavar="OTHER",
                        help="other campaign dirs to put beside it")  # fmt: skip
    report.add_argument("--out", type=_where, default=None, help="default: <campaign>/report")
    report.set_defaults(func=cmd_report)

    add_train_parser(sub)

    demo = sub.add_parser("demo", help="testbed + stats + a ROME campaign + table + plot")
    demo.add_argument("--out", type=Path, default=Path("runs/demo"))
    demo.add_argument("--edits", type=int, default=200)
    demo.add_argument("--facts", type=int, default=300)
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(func=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; its exit status.

    0: done. 2: a user error, printed as one line `seqedit: error: ...` on stderr (with -v:
    raised, traceback and all): a `SeqeditError`, a missing file, a value pydantic refused,
    a cluster address nobody answers at. 130: interrupted. 141 (128 + SIGPIPE, what a shell
    reports for a command whose reader went away): stdout was closed early, as by
    `seqedit status DIR | head -1`; nothing is printed. Any other exception is a bug or a
    fault of the environment (torch, CUDA, Ray) and keeps its traceback.
    """
    from pydantic import ValidationError

    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        args.func(args)
        sys.stdout.flush()  # a reader that went away shows here, not at interpreter exit
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # before ConnectionError, its base class
        _drop_stdout()
        return 141
    except (SeqeditError, FileNotFoundError, ValidationError, ConnectionError) as exc:
        if args.verbose:
            raise
        print(f"seqedit: error: {exc}", file=sys.stderr)
        return 2
    return 0


def _drop_stdout() -> None:
    """Point stdout at /dev/null, so that the interpreter's last flush of what is still
    buffered for a closed pipe does not fail again (and print "Broken pipe") at exit."""
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):  # not a file (captured, replaced)
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, fd)
    os.close(devnull)


if __name__ == "__main__":
    sys.exit(main())
