"""What each CLI command does, as functions (the CLI parses arguments and prints)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import pyarrow as pa
from tqdm.auto import tqdm
from transformers import AutoConfig

from seqedit.methods.arch import module_names_for_type
from seqedit.pipeline.campaign_dir.state import CampaignState
from seqedit.pipeline.cli.campaign_ops import validate_spec
from seqedit.pipeline.cli.handlers import CliError
from seqedit.pipeline.results.plot_data import layer_drift, update_norms
from seqedit.pipeline.results.plots import plot_degradation, plot_health, plot_norm_growth
from seqedit.pipeline.results.views import query
from seqedit.pipeline.run.driver import run_campaign
from seqedit.schemas.campaign import ResourcesSpec
from seqedit.storage import Location, Where, location
from seqedit.workers.stats import META_FILE, StatsConfig, StatsMeta, compute_stats
from seqedit.workers.stats_store import load_accumulators, save_stats

if TYPE_CHECKING:
    from seqedit.pipeline.run.stats_job import StatsJobReport
    from seqedit.pipeline.run.stats_until_stable import UntilStable
    from seqedit.testbed.build import TestbedReport

CURVE_SQL = """
WITH immediate AS (
    SELECT count(*) OVER (ORDER BY step) AS n, avg(CAST(success AS DOUBLE))
        OVER (ORDER BY step, case_id ROWS BETWEEN {window} PRECEDING AND CURRENT ROW)
        AS immediate_es
    FROM edits
)
SELECT e.n_edits_applied,
       any_value(e.protocol) AS protocol,
       count(*) AS records,
       avg(e.es) AS es,
       avg(e.ps) AS ps,
       avg(e.ns) AS ns,
       any_value(i.immediate_es) AS immediate_es
FROM evals e LEFT JOIN immediate i ON i.n = e.n_edits_applied
WHERE e.protocol <> 'immediate'
GROUP BY e.n_edits_applied
ORDER BY e.n_edits_applied
"""


HEALTH_PER_EDIT_SQL = """
WITH numbered AS (SELECT *, count(*) OVER (ORDER BY step) AS n FROM edits)
SELECT n,
       avg(CAST(success AS DOUBLE)) OVER w AS success_rate,
       median(p_new_after) OVER w AS median_p_new
FROM numbered WHERE NOT rolled_back
WINDOW w AS (ORDER BY step, case_id ROWS BETWEEN {window} PRECEDING AND CURRENT ROW)
ORDER BY step, case_id
"""

HEALTH_PERIODIC_SQL = """
WITH applied AS (SELECT DISTINCT step, count(*) OVER (ORDER BY step) AS n FROM edits)
SELECT n, retention, locality_top1, locality_kl, perplexity_ratio, weight_drift
FROM periodic JOIN applied USING (step) ORDER BY step
"""


def curve_sql(window: int = 25) -> str:
    """Degradation curve: ES/PS/NS of all records edited so far, at each evaluation point,
    beside the immediate (right-after-the-edit) success rate of the last `window` edits."""
    return CURVE_SQL.format(window=window - 1)


@contextmanager
def progress_bar(total: int, desc: str, enabled: bool) -> Iterator[Callable[[int, int], None]]:
    """A tqdm bar driven by (done, total) callbacks."""
    bar = tqdm(total=total, desc=desc, unit="edit", disable=not enabled, dynamic_ncols=True)

    def update(done: int, _total: int) -> None:
        bar.update(done - bar.n)

    try:
        yield update
    finally:
        bar.close()


def build_testbed_command(
    out: Path,
    *,
    dataset: Path | None,
    limit: int | None,
    synthetic: int | None,
    seed: int,
    progress: bool,
    architecture: str = "gpt2",
    split: str | None = None,
    split_seed: int | None = None,
    english: str = "auto",
) -> TestbedReport:
    """`seqedit testbed build`: facts from a dataset file or a synthetic world; `split`
    ('0.8,0.1,0.1') also splits the requests by subject into splits.json; `english`
    ('auto', 'none' or a file) the English a dataset testbed learns beside its facts."""
    from seqedit.testbed.build import TestbedConfig, build_synthetic_testbed
    from seqedit.testbed.dataset import build_dataset_testbed
    from seqedit.testbed.splits import SplitSpec

    if split is None and split_seed is not None:
        raise CliError("--split-seed goes with --split")
    spec = None if split is None else SplitSpec.parse(split, seed=split_seed or 0)
    if dataset is not None:
        return build_dataset_testbed(
            out, dataset, limit=limit, seed=seed, architecture=architecture,
            english=None if english == "none" else english, progress=progress, split=spec,
        )  # fmt: skip
    if english != "auto":
        raise CliError("--english goes with --dataset; a synthetic world is facts only")
    config = TestbedConfig.model_validate({"seed": seed, "architecture": architecture})
    if limit is not None:
        raise CliError("--limit goes with --dataset; --synthetic N already sets the size")
    assert synthetic is not None
    return build_synthetic_testbed(out, synthetic, seed, config, progress=progress, split=spec)


def build_stats_command(
    model: Path,
    layers: list[int],
    corpus: list[str],
    out: Where,
    *,
    batch_size: int,
    max_length: int | None,
    dtype: str,
    n_samples: int | None = None,
    seed: int = 0,
    text_column: str = "text",
    shards: int = 1,
    actors: int = 2,
    cpus_per_actor: float = 1,
    gpus_per_actor: float = 0,
    progress: bool,
    until_stable: UntilStable | None = None,
) -> tuple[StatsMeta, StatsJobReport | None]:
    """`seqedit stats build`: every layer's second moment in one pass, saved with provenance;
    with `shards` > 1, sharded across `actors` Ray actors (each with `cpus_per_actor` CPUs
    and `gpus_per_actor` GPUs) and resumable."""
    model_type = AutoConfig.from_pretrained(model, local_files_only=True).model_type
    config = StatsConfig(
        layers=layers,
        corpus=corpus,
        text_column=text_column,
        module_tmp=module_names_for_type(model_type).rewrite_module_tmp,
        batch_size=batch_size,
        max_length=max_length,
        dtype=dtype,  # type: ignore[arg-type]
        n_samples=n_samples,
        seed=seed,
    )
    if shards > 1:
        from seqedit.pipeline.run.stats_job import build_stats_sharded

        resources = ResourcesSpec(num_cpus=cpus_per_actor, num_gpus=gpus_per_actor)
        result, report = build_stats_sharded(
            model, config, out, shards=shards, actors=actors, resources=resources,
            progress=progress, until_stable=until_stable,
        )  # fmt: skip
        return result.meta, report
    result = compute_stats(model, config, progress=progress)
    save_stats(out, result)
    return result.meta, None


def list_stats(root: Where) -> pa.Table:
    """`seqedit stats ls`: every stats directory under `root` (a local path or a storage
    URI; a stats directory is one holding stats.json), with its provenance and whether its
    file checks out (corrupt files are listed, not used)."""
    top = location(root)
    rows = []
    found = {folder.fs_path[len(top.fs_path) :].strip("/"): folder for folder in _stats_dirs(top)}
    for relative in sorted(found, key=lambda name: name.split("/")):
        folder = found[relative]
        row: dict[str, object] = {"dir": relative or "."}
        try:
            meta = load_accumulators(folder).meta
            row.update(
                layers=",".join(str(layer) for layer in meta.layers),
                model=Path(meta.model_dir).name,
                model_fp=meta.model_fingerprint[:12],
                corpus_fp=meta.corpus_fingerprint[:12],
                documents=meta.n_documents,
                tokens=meta.token_count,
                dtype=meta.dtype,
                version=meta.seqedit_version,
                status="ok",
            )
        except (ValueError, OSError) as exc:
            row["status"] = "refused: " + " ".join(str(exc).split())[:160]
        rows.append(row)
    columns = ["dir", "layers", "model", "model_fp", "corpus_fp", "documents", "tokens",
               "dtype", "version", "status"]  # fmt: skip
    return pa.Table.from_pylist([{c: r.get(c) for c in columns} for r in rows])


def _stats_dirs(folder: Location) -> Iterator[Location]:
    """`folder` and every folder under it that holds a stats.json, walked through its
    location (local or remote). Safetensors files are never folders: not asked about."""
    entries = folder.iterdir()
    if any(entry.name == META_FILE for entry in entries):
        yield folder
    for entry in entries:
        if not entry.name.endswith(".safetensors") and entry.is_dir():
            yield from _stats_dirs(entry)


def run_campaign_command(spec_file: Path, out: Where, *, progress: bool) -> CampaignState:
    """`seqedit run`: a campaign spec on the embedded local Ray, with a progress bar. The
    schema, method, hparams and edits_per_step are checked first, before Ray starts."""
    spec = validate_spec(spec_file, schema_only=True)
    with progress_bar(spec.n_edits, spec.name, progress) as update:
        return run_campaign(spec, out, progress=update)


def trend_rows(campaign_dir: Where) -> tuple[pa.Table, int]:
    """HEALTH_PER_EDIT_SQL rolling over 1/20 of the campaign's edits (at least 50: the
    default health window), so that a trend over 10,000 edits stays readable; the window."""
    (edits,) = query(campaign_dir, "SELECT count(*) AS n FROM edits").column("n").to_pylist()
    window = max(50, edits // 20)
    return query(campaign_dir, HEALTH_PER_EDIT_SQL.format(window=window - 1)), window


def _draw_degradation(campaign_dir: Where, name: str, png: Location) -> Location | None:
    """The degradation plot, when the campaign has evaluation rows."""
    curve = query(campaign_dir, curve_sql())
    if not curve.num_rows:
        return None
    per_edit, window = trend_rows(campaign_dir)
    periodic = query(campaign_dir, HEALTH_PERIODIC_SQL)
    title = f"{name}: CounterFact scores against edits applied"
    return plot_degradation(curve, per_edit, periodic, png, title=title, window=window)


def _draw_health(campaign_dir: Where, name: str, png: Location) -> Location | None:
    """The health panels, when the campaign has edit rows."""
    per_edit = query(campaign_dir, HEALTH_PER_EDIT_SQL.format(window=49))
    if not per_edit.num_rows:
        return None
    periodic = query(campaign_dir, HEALTH_PERIODIC_SQL)
    return plot_health(per_edit, periodic, png, title=f"{name}: health against edits applied")


def _draw_norm_growth(campaign_dir: Where, name: str, png: Location) -> Location | None:
    """Update norms and per-layer weight drift, when the campaign has edit rows."""
    norms = update_norms(campaign_dir)
    if not norms.num_rows:
        return None
    runs = {name: (norms, layer_drift(campaign_dir))}
    return plot_norm_growth(runs, png, title=f"{name}: norm growth against edits applied")


class CampaignPlot(NamedTuple):
    """One plot of a campaign: file name, caption, and how it is drawn (None: no data)."""

    name: str
    caption: str
    draw: Callable[[Where, str, Location], Location | None]


CAMPAIGN_PLOTS = (
    CampaignPlot("degradation", "ES/PS/NS at the evaluation points, with the rolling immediate "
                 "efficacy and the periodic retention of earlier edits.", _draw_degradation),
    CampaignPlot("health", "Health signals: edits that hold, P(target_new) after each edit, "
                 "damage outside the edits, weight drift.", _draw_health),
    CampaignPlot("norm-growth", "Norm growth: the update norm of each edit and the relative "
                 "drift ‖W_t − W_0‖/‖W_0‖ of each edited layer.", _draw_norm_growth),
)  # fmt: skip
"""The plots of one campaign, in the order `seqedit plot` and `seqedit report` write them."""


def campaign_plots(campaign_dir: Where, out: Where | None = None) -> list[tuple[str, Location]]:
    """Write a campaign's plots; (caption, path) of each. Files: `<campaign>/<name>.png`,
    or with `out` the first plot at `out` and the others at `<out stem>-<name>.png`.
    Raises when there is nothing to plot yet."""
    state = CampaignState.load(campaign_dir)
    written = []
    first = location(out) if out is not None else None
    for plot in CAMPAIGN_PLOTS:
        if first is None:
            png = location(campaign_dir) / f"{plot.name}.png"
        else:
            stem = first.name.rsplit(".", 1)[0]
            png = first if plot is CAMPAIGN_PLOTS[0] else first.parent / f"{stem}-{plot.name}.png"
        if path := plot.draw(campaign_dir, state.campaign, png):
            written.append((plot.caption, path))
    if not written:
        raise CliError(f"{campaign_dir}: no finished shard yet; nothing to plot")
    return written


def plot_campaign(campaign_dir: Where, out: Where | None = None) -> list[Location]:
    """`seqedit plot`: the paths campaign_plots writes."""
    return [path for _, path in campaign_plots(campaign_dir, out)]
