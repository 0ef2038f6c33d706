"""What each `seqedit` subcommand does with its parsed arguments: call the pipeline, print.

`main.build_parser` maps every subcommand to one `cmd_*` function here; the work itself
lives in the pipeline's modules, imported when a command runs (so `seqedit --help` stays
fast).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from seqedit.errors import SeqeditError
from seqedit.storage import Location, StorageError, location

if TYPE_CHECKING:
    from seqedit.pipeline.run.stats_until_stable import UntilStable
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
        split=args.split,
        split_seed=args.split_seed,
        english=args.english,
    )
    sizes = report.split_sizes
    split = "" if sizes is None else ", split " + " / ".join(f"{n} {k}" for n, k in sizes.items())
    print(
        f"testbed: {report.n_facts} facts, top-1 recall {report.recall:.1%}, "
        f"trained in {report.train_seconds:.1f}s ({report.steps} steps){split} -> {args.out}"
    )
    if report.heldout_perplexity is not None:
        print(
            f"a language model: held-out English perplexity {report.heldout_perplexity:.1f}, "
            f"{report.n_support} support records (closure under targets)"
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
        until_stable=_until_stable(args),
    )
    print(f"stats: layers {args.layers}, {meta.token_count} tokens -> {args.out}")
    if meta.until_stable is not None:
        info = meta.until_stable
        verdict = "stable" if info["stable"] else "not stable by the end of the corpus"
        change = info["final_change"]
        print(f"until stable (eps {info['eps']:g}): {verdict} after {info['shards_used']} of "
              f"{info['shards_total']} shards, {info['tokens_used']} tokens, last relative "
              f"change {'n/a' if change is None else f'{change:.3g}'}")  # fmt: skip
    if report is not None:
        rate = f", {report.tokens_per_second:.0f} tokens/s" if report.computed else ""
        print(f"shards: {report.shards} ({report.computed} computed, {report.reused} reused "
              f"from an earlier run, {report.retried} handed out again){rate}")  # fmt: skip


def _until_stable(args: argparse.Namespace) -> UntilStable | None:
    """The `--until-stable` rule of `stats build`, or None."""
    if args.until_stable is None:
        if args.probe_requests is not None:
            raise CliError("--probe-requests is only read with --until-stable")
        return None
    if args.shards < 2:
        raise CliError("--until-stable needs --shards N > 1: the shards are its chunks")
    if args.probe_requests is None:
        raise CliError("--until-stable needs --probe-requests FILE: the keys it watches")
    if not 0 < args.until_stable < 1:
        raise CliError(f"--until-stable {args.until_stable}: a relative change in (0, 1)")
    from seqedit.pipeline.run.stats_until_stable import UntilStable
    from seqedit.schemas.loaders import load_requests

    requests = load_requests(args.probe_requests).requests
    return UntilStable.of_requests(args.until_stable, requests, args.probes,
                                   args.nullspace_threshold)  # fmt: skip


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


def cmd_export(args: argparse.Namespace) -> None:
    from seqedit.pipeline.cli.peft_export import export_peft

    report = export_peft(args.campaign_dir, args.step, args.out, rank=args.rank)
    error = report.max_relative_error
    how = "exact" if report.exact else f"truncated SVD, max relative error {error:.3g}"
    print(
        f"{report.method} edits of steps 0..{args.step} ({report.steps_with_updates} applied) "
        f"-> PEFT LoRA adapter r={report.r} on {len(report.modules)} modules ({how}) -> {args.out}"
    )


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
    from seqedit.pipeline.cli.training_import import import_training, render_training_yaml

    if args.training:
        training = import_training(args.file, method=args.method)
        text = render_training_yaml(training, args.file)
        summary = f"training config: {training.method} from {args.file}"
    else:
        imported = import_hparams(args.file, method=args.method)
        text = render_yaml(imported, args.file)
        summary = (
            f"hparams: {imported.method} from {imported.source_format} {args.file}, "
            f"{len(imported.dropped)} dropped, {len(imported.renamed)} renamed"
        )
    if args.out is None:
        print(text, end="")
        return
    write_text_atomic(args.out, text)
    print(f"{summary} -> {args.out}")


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
