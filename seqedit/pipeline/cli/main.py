"""The `seqedit` command line. It owns the terminal: progress bars, tables, exit codes."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from seqedit import __version__
from seqedit.errors import SeqeditError
from seqedit.storage import Location, StorageError, location

if TYPE_CHECKING:
    from seqedit.pipeline.run.submit import SubmittedJob


class CliError(SeqeditError, ValueError):
    """A command-line request that cannot be carried out (a flag that does not fit the
    campaign, nothing to plot yet), printed as one clear line, exit status 2. Also a
    ValueError, as what it replaced was, for the callers that catch those."""


def _layers(text: str) -> list[int]:
    try:
        layers = [int(part) for part in text.split(",") if part.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"layers must be like 1,2 — got {text!r}") from exc
    if not layers:
        raise argparse.ArgumentTypeError("give at least one layer")
    return layers


def cmd_testbed_build(args: argparse.Namespace) -> None:
    from seqedit.pipeline.cli.commands import build_testbed_command

    report = build_testbed_command(
        args.out,
        dataset=args.dataset,
        limit=args.limit,
        synthetic=args.synthetic,
        seed=args.seed,
        progress=not args.quiet,
        architecture=args.architecture,
    )
    print(
        f"testbed: {report.n_facts} facts, top-1 recall {report.recall:.1%}, "
        f"trained in {report.train_seconds:.1f}s ({report.steps} steps) -> {args.out}"
    )


def cmd_stats_build(args: argparse.Namespace) -> None:
    from seqedit.pipeline.cli.commands import build_stats_command

    meta, report = build_stats_command(
        args.model,
        args.layers,
        args.corpus,
        args.out,
        batch_size=args.batch_size,
        max_length=args.max_length,
        dtype=args.dtype,
        n_samples=args.samples,
        seed=args.seed,
        text_column=args.text_column,
        shards=args.shards,
        actors=args.actors,
        cpus_per_actor=args.cpus_per_actor,
        gpus_per_actor=args.gpus_per_actor,
        progress=not args.quiet,
    )
    print(f"stats: layers {args.layers}, {meta.token_count} tokens -> {args.out}")
    if report is not None:
        rate = f", {report.tokens_per_second:.0f} tokens/s" if report.computed else ""
        print(f"shards: {report.shards} ({report.computed} computed, {report.reused} reused "
              f"from an earlier run, {report.retried} handed out again){rate}")  # fmt: skip


def cmd_stats_ls(args: argparse.Namespace) -> None:
    from seqedit.pipeline.cli.commands import list_stats
    from seqedit.pipeline.results.tables_format import format_table

    print(format_table(list_stats(args.root), args.format))


def cmd_run(args: argparse.Namespace) -> None:
    from seqedit.pipeline.cli.commands import run_campaign_command

    state = run_campaign_command(args.spec, args.out, progress=not args.quiet)
    print(f"campaign {state.campaign}: {state.status} -> {args.out}")


def cmd_submit(args: argparse.Namespace) -> None:
    from seqedit.pipeline.run.submit import is_job_server, submit_campaign

    if args.address is None or not is_job_server(args.address):
        # no cluster: run it here; `auto`, `ray://HEAD:10001` or `HEAD:6379`: the driver
        # runs here and places its actors on that cluster
        previous = os.environ.get("RAY_ADDRESS")
        if args.address is not None:
            os.environ["RAY_ADDRESS"] = args.address
        try:
            cmd_run(args)
        finally:  # `main` may run in a longer-lived process (tests, notebooks)
            if previous is None:
                os.environ.pop("RAY_ADDRESS", None)
            else:
                os.environ["RAY_ADDRESS"] = previous
        return

    job = submit_campaign(args.spec, args.out, args.address)
    print(f"submitted {job.job_id} to {job.address}: {job.entrypoint}")
    _maybe_wait(job, args.wait)


def _maybe_wait(job: SubmittedJob, wait: bool) -> None:
    from seqedit.pipeline.run.submit import job_logs, wait_for

    if not wait:
        print(f"follow it: seqedit status DIR / seqedit logs DIR (job {job.job_id})")
        return
    status = wait_for(job)
    print(job_logs(job), end="")
    print(f"job {job.job_id}: {status}")
    if str(status) != "SUCCEEDED":
        raise SystemExit(1)


def cmd_logs(args: argparse.Namespace) -> None:
    from seqedit.pipeline.run.submit import job_logs, recorded_job

    print(job_logs(recorded_job(args.campaign_dir)), end="")


def cmd_cancel(args: argparse.Namespace) -> None:
    from seqedit.pipeline.run.submit import cancel_job, recorded_job

    job = recorded_job(args.campaign_dir)
    stopped = cancel_job(job)
    print(f"job {job.job_id}: {'stopping' if stopped else 'had already ended'}")


def cmd_validate(args: argparse.Namespace) -> None:
    from seqedit.pipeline.cli.campaign_ops import plan_disk, validate_spec
    from seqedit.pipeline.cli.disk_plan import format_estimate

    spec = validate_spec(args.spec, schema_only=args.schema_only)
    checked = "schema and hparams" if args.schema_only else "schema, hparams, model, data, stats"
    print(
        f"{args.spec}: ok ({checked}): {spec.name}, {spec.method}, {spec.n_edits} edits "
        f"in shards of {spec.shard_size or spec.n_edits}"
    )
    estimate, message = plan_disk(spec, budget_gb=args.disk_budget)
    if estimate is None:
        print(message)
        return
    print("disk estimate (written by the campaign):")
    print(format_estimate(estimate))
    if message is not None:
        print(f"seqedit: warning: {message}", file=sys.stderr)


def cmd_status(args: argparse.Namespace) -> None:
    from seqedit.pipeline.campaign_dir.state import STATE_FILE
    from seqedit.pipeline.cli.campaign_ops import status_table
    from seqedit.pipeline.results.tables_format import format_table
    from seqedit.pipeline.run.submit import JOB_FILE, job_status, recorded_job

    if (args.campaign_dir / JOB_FILE).is_file():
        job = recorded_job(args.campaign_dir)
        print(f"job {job.job_id} at {job.address}: {job_status(job)}")
        if not (args.campaign_dir / STATE_FILE).is_file():
            print("the campaign has not started yet (no state.json)")
            return
    state, table, live = status_table(args.campaign_dir)
    done = sum(s.steps_done if s.status != "done" else s.stop - s.start for s in state.shards)
    total = state.shards[-1].stop if state.shards else 0
    shown = state.status
    if state.status == "running" and not live:
        shown = "interrupted (no driver is running it; `seqedit rerun` continues it)"
    print(f"campaign {state.campaign}: {shown}, {done}/{total} steps, "
          f"updated {state.updated_at}")  # fmt: skip
    print(format_table(table))


def cmd_rerun(args: argparse.Namespace) -> None:
    from seqedit.pipeline.cli.campaign_ops import frozen_spec, rerun_campaign, rerun_selection
    from seqedit.pipeline.cli.commands import progress_bar

    if args.address is not None:
        from seqedit.pipeline.run.submit import submit_rerun

        flags = ["--failed"] if args.failed else []
        flags += ["--shard", str(args.shard)] if args.shard is not None else []
        job = submit_rerun(args.campaign_dir, args.address, flags)
        print(f"submitted {job.job_id} to {job.address}: {job.entrypoint}")
        _maybe_wait(job, args.wait)
        return
    spec = frozen_spec(args.campaign_dir)
    shards = rerun_selection(args.campaign_dir, failed=args.failed, shard=args.shard)
    with progress_bar(spec.n_edits, spec.name, not args.quiet) as update:
        state = rerun_campaign(args.campaign_dir, progress=update, shards=shards)
    print(f"campaign {state.campaign}: {state.status} -> {args.campaign_dir}")


def cmd_rebuild(args: argparse.Namespace) -> None:
    from seqedit.pipeline.cli.campaign_ops import rebuild_model

    fingerprint = rebuild_model(args.campaign_dir, args.step, args.out)
    print(f"model after step {args.step} (weights {fingerprint[:12]}) -> {args.out}")


def cmd_edit(args: argparse.Namespace) -> None:
    from seqedit.pipeline.cli.edit_command import edit_model
    from seqedit.schemas.tables import EditRow

    def show(row: EditRow) -> None:
        if not args.quiet:
            verdict = "ok" if row.success else "FAILED"
            print(
                f"step {row.step} case {row.case_id}: P(new) "
                f"{row.p_new_before:.3f} -> {row.p_new_after:.3f}, {verdict}"
            )

    rows = edit_model(
        args.model,
        args.method,
        args.hparams,
        args.requests,
        stats=args.stats,
        save_deltas=args.save_deltas,
        save_model=args.save_model,
        batch=args.batch,
        on_edit=show,
    )
    succeeded = sum(r.success for r in rows)
    print(f"{succeeded}/{len(rows)} edits succeeded; deltas -> {args.save_deltas}")


def cmd_hparams_import(args: argparse.Namespace) -> None:
    from seqedit.files import write_text_atomic
    from seqedit.pipeline.cli.hparams_import import import_hparams, render_yaml

    imported = import_hparams(args.file, method=args.method)
    text = render_yaml(imported, args.file)
    if args.out is None:
        print(text, end="")
        return
    write_text_atomic(args.out, text)
    print(
        f"hparams: {imported.method} from {imported.source_format} {args.file}, "
        f"{len(imported.dropped)} dropped, {len(imported.renamed)} renamed -> {args.out}"
    )


def _other_campaign(text: str) -> tuple[str, Location]:
    name, sep, folder = text.partition("=")
    if not sep or not name or not folder:
        raise argparse.ArgumentTypeError(f"expected NAME=DIR, e.g. b=runs/other — got {text!r}")
    return name, _where(folder)


def cmd_query(args: argparse.Namespace) -> None:
    from seqedit.pipeline.results.tables_format import format_table
    from seqedit.pipeline.results.views import query

    others: dict[str, Path] = {}
    for name, folder in args.others:
        if name in others:
            raise CliError(f"--with {name}=...: the name {name!r} is given twice")
        others[name] = folder
    print(format_table(query(args.campaign_dir, args.sql, others), args.format))


def cmd_compact(args: argparse.Namespace) -> None:
    from seqedit.pipeline.campaign_dir.compact import compact

    report = compact(args.campaign_dir)
    for leftover in report.leftovers_removed:
        print(f"removed the leftover of an interrupted compact: tables/{leftover}")
    for t in report.tables:
        print(
            f"{t.table}: {t.parts_before} -> {t.parts_after} parts, "
            f"{t.bytes_before / 1024:.1f} -> {t.bytes_after / 1024:.1f} KiB"
        )
    print(f"{report.partitions_compacted} partitions compacted -> {args.campaign_dir}")


def cmd_plot(args: argparse.Namespace) -> None:
    from seqedit.pipeline.cli.commands import plot_campaign

    for path in plot_campaign(args.campaign_dir, args.out):
        print(f"plot -> {path}")


def cmd_report(args: argparse.Namespace) -> None:
    from seqedit.pipeline.results.report import write_report

    page = write_report(args.campaign_dir, out=args.out, compare=args.compare)
    print(f"report -> {page}")


def cmd_demo(args: argparse.Namespace) -> None:
    from seqedit.pipeline.cli.demo import run_demo

    started = time.perf_counter()
    run_demo(Path(args.out), n_edits=args.edits, n_facts=args.facts, seed=args.seed)
    print(f"demo finished in {time.perf_counter() - started:.0f}s")


WHERE_HELP = "campaign directory: a path or a storage URI (s3://bucket/runs/a?...)"


def _where(text: str) -> Location:
    """A campaign or stats location from the command line (a path or a storage URI)."""
    try:
        return location(text)
    except StorageError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


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
    sbuild.add_argument("--quiet", action="store_true")
    sbuild.set_defaults(func=cmd_stats_build)
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
    submit.add_argument("--out", required=True, type=_where,
                        help="campaign directory every node reaches: a shared path or a URI")
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

    q = sub.add_parser("query", help="read-only SQL over a campaign's tables (DuckDB)")
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
    plot.add_argument("--out", type=_where, default=None,
                      help="default: <campaign>/degradation.png")
    plot.set_defaults(func=cmd_plot)

    report = sub.add_parser(
        "report", help="HTML page with a campaign's plots and summary (optionally compared)"
    )
    report.add_argument("campaign_dir", type=_where, help=WHERE_HELP)
    report.add_argument("--compare", nargs="+", type=_where, default=[], metavar="OTHER",
                        help="other campaign dirs to put beside it")  # fmt: skip
    report.add_argument("--out", type=_where, default=None, help="default: <campaign>/report")
    report.set_defaults(func=cmd_report)

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
