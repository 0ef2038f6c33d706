"""What each CLI command does, as functions (the CLI parses arguments and prints)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from tqdm.auto import tqdm
from transformers import AutoConfig

from seqedit.methods.arch import module_names_for_type
from seqedit.pipeline.driver import run_campaign
from seqedit.pipeline.plots import plot_degradation, plot_health
from seqedit.pipeline.state import CampaignState
from seqedit.pipeline.store import query
from seqedit.schemas.campaign import load_spec
from seqedit.workers.stats import StatsConfig, StatsMeta, compute_stats
from seqedit.workers.stats_store import save_stats

if TYPE_CHECKING:
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
) -> TestbedReport:
    """`seqedit testbed build`: facts from a dataset file or a synthetic world."""
    from seqedit.testbed.build import (
        TestbedConfig,
        build_dataset_testbed,
        build_synthetic_testbed,
    )

    config = TestbedConfig.model_validate({"seed": seed, "architecture": architecture})
    if dataset is not None:
        return build_dataset_testbed(out, dataset, limit=limit, config=config, progress=progress)
    if limit is not None:
        raise ValueError("--limit goes with --dataset; --synthetic N already sets the size")
    assert synthetic is not None
    return build_synthetic_testbed(out, synthetic, seed, config, progress=progress)


def build_stats_command(
    model: Path,
    layers: list[int],
    corpus: list[Path],
    out: Path,
    *,
    batch_size: int,
    max_length: int | None,
    dtype: str,
    progress: bool,
) -> StatsMeta:
    """`seqedit stats build`: every layer's second moment in one pass, saved with provenance."""
    model_type = AutoConfig.from_pretrained(model, local_files_only=True).model_type
    config = StatsConfig(
        layers=layers,
        corpus=corpus,
        module_tmp=module_names_for_type(model_type).rewrite_module_tmp,
        batch_size=batch_size,
        max_length=max_length,
        dtype=dtype,  # type: ignore[arg-type]
    )
    result = compute_stats(model, config, progress=progress)
    save_stats(out, result)
    return result.meta


def run_campaign_command(spec_file: Path, out: Path, *, progress: bool) -> CampaignState:
    """`seqedit run`: a campaign spec on the embedded local Ray, with a progress bar."""
    spec = load_spec(spec_file)
    with progress_bar(spec.n_edits, spec.name, progress) as update:
        return run_campaign(spec, out, progress=update)


def plot_campaign(campaign_dir: Path, out: Path | None = None) -> list[Path]:
    """Write a campaign's plots: the degradation curve (when it has evaluation rows,
    `out` or <campaign>/degradation.png) and the health panels (<stem>-health.png or
    <campaign>/health.png). Raises when there is nothing to plot yet."""
    state = CampaignState.load(campaign_dir)
    curve_png = out or Path(campaign_dir) / "degradation.png"
    written = []
    curve = query(campaign_dir, curve_sql())
    if curve.num_rows:
        title = f"{state.campaign}: edits applied vs. CounterFact scores"
        written.append(plot_degradation(curve, curve_png, title=title))
    per_edit = query(campaign_dir, HEALTH_PER_EDIT_SQL.format(window=49))
    if per_edit.num_rows:
        health_png = (
            curve_png.with_name(curve_png.stem + "-health.png")
            if out
            else Path(campaign_dir) / "health.png"
        )
        periodic = query(campaign_dir, HEALTH_PERIODIC_SQL)
        title = f"{state.campaign}: health against edits applied"
        written.append(plot_health(per_edit, periodic, health_png, title=title))
    if not written:
        raise ValueError(f"{campaign_dir}: no finished shard yet; nothing to plot")
    return written
