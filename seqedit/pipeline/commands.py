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
from seqedit.pipeline.plots import plot_degradation
from seqedit.pipeline.state import CampaignState
from seqedit.pipeline.store import query
from seqedit.schemas.campaign import load_spec
from seqedit.workers.stats import StatsConfig, StatsMeta, compute_stats
from seqedit.workers.stats_store import save_stats

if TYPE_CHECKING:
    from seqedit.testbed.build import TestbedReport

CURVE_SQL = """
WITH immediate AS (
    SELECT step + 1 AS n, avg(CAST(success AS DOUBLE))
        OVER (ORDER BY step ROWS BETWEEN {window} PRECEDING AND CURRENT ROW) AS immediate_es
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


def plot_campaign(campaign_dir: Path, out: Path | None = None) -> Path:
    """Write the degradation-curve PNG of a campaign."""
    state = CampaignState.load(campaign_dir)
    curve = query(campaign_dir, curve_sql())
    if curve.num_rows == 0:
        raise ValueError(f"{campaign_dir}: no evaluation rows yet; nothing to plot")
    return plot_degradation(
        curve,
        out or Path(campaign_dir) / "degradation.png",
        title=f"{state.campaign}: edits applied vs. CounterFact scores",
    )
