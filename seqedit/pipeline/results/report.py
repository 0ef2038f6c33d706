"""`seqedit report`: one HTML page per campaign (or several, compared) with its plots and a
summary table, written next to the PNGs it shows. Everything comes from the DuckDB views."""

from __future__ import annotations

import contextlib
import html
import json
from collections.abc import Sequence

from seqedit.pipeline.campaign_dir.state import CampaignState
from seqedit.pipeline.cli.commands import HEALTH_PERIODIC_SQL, campaign_plots, trend_rows
from seqedit.pipeline.results.plot_data import layer_drift, update_norms
from seqedit.pipeline.results.plots import plot_norm_growth
from seqedit.pipeline.results.plots_compare import CompareRun, plot_compare
from seqedit.pipeline.results.train_report import write_train_report
from seqedit.pipeline.results.train_views import is_training_dir
from seqedit.pipeline.results.views import QueryError, query
from seqedit.storage import Location, Where, location

SUMMARY_SQL = """
WITH last AS (
  SELECT protocol, es, ps, ns, score FROM curves WHERE protocol <> 'immediate'
  ORDER BY n_edits_applied DESC LIMIT 1
)
SELECT
  (SELECT count(*) FROM edits) AS edits,
  (SELECT count(*) FILTER (WHERE rolled_back) FROM edits) AS rolled_back,
  (SELECT avg(success::INT) FILTER (WHERE NOT rolled_back) FROM edits) AS immediate_es,
  (SELECT median(p_new_after) FROM edits) AS median_p_new,
  (SELECT max(weight_drift) FROM edits) AS max_weight_drift,
  last.es AS last_es,
  last.ps AS last_ps,
  last.ns AS last_ns,
  last.score AS last_score,
  last.protocol AS last_protocol,
  (SELECT count(*) FILTER (WHERE NOT passed) FROM health) AS failed_checks,
  (SELECT sum(seconds) FROM edits) AS edit_seconds,
  (SELECT sum(check_seconds) FROM edits) + (SELECT coalesce(sum(seconds), 0) FROM health)
    AS health_seconds
FROM (SELECT 1) LEFT JOIN last ON true
"""
"""One row: what a reader wants first about a campaign (last = the latest evaluation)."""

COLUMNS = {
    "campaign": "campaign", "method": "method", "status": "status", "edits": "edits",
    "rolled_back": "rolled back", "immediate_es": "immediate ES",
    "median_p_new": "median P(new) after edit", "last_protocol": "last eval",
    "last_es": "ES", "last_ps": "PS", "last_ns": "NS", "last_score": "score",
    "max_weight_drift": "max weight drift", "failed_checks": "failed checks",
    "edit_seconds": "edit s", "health_seconds": "health s",
}  # fmt: skip


def campaign_summary(campaign_dir: Where) -> dict[str, object]:
    """The summary row of one campaign: state, method and SUMMARY_SQL."""
    state = CampaignState.load(campaign_dir)
    method_file = location(campaign_dir) / "method.json"
    method = json.loads(method_file.read_text())["method"] if method_file.is_file() else "?"
    (row,) = query(campaign_dir, SUMMARY_SQL).to_pylist()
    return {"campaign": state.campaign, "method": method, "status": state.status, **row}


def _cell(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return html.escape("" if value is None else str(value))


def _by_name(summaries: list[dict[str, object]], campaigns: list[Location]) -> dict[str, Location]:
    """{legend name: directory}: the campaign names, with the directory where two clash."""
    names = [str(s["campaign"]) for s in summaries]
    return {
        name if names.count(name) == 1 else f"{name} ({c.name})": c
        for name, c in zip(names, campaigns, strict=True)
    }


def compare_plots(campaigns: dict[str, Location], folder: Location) -> list[tuple[str, Location]]:
    """(caption, path) of the plots comparing `campaigns` (name -> directory), written to
    `folder`: degradation over the run with the CounterFact scores, and norm growth."""
    runs = {
        name: CompareRun(
            query(c, "SELECT * FROM curves WHERE protocol <> 'immediate' ORDER BY n_edits_applied"),
            *trend_rows(c),
            query(c, HEALTH_PERIODIC_SQL),
        )
        for name, c in campaigns.items()
    }
    norms = {name: (update_norms(c), layer_drift(c)) for name, c in campaigns.items()}
    return [
        ("Campaigns compared: immediate efficacy, retention and P(target_new) over the run, "
         "and the CounterFact scores.", plot_compare(runs, folder / "compare.png")),
        ("Campaigns compared: update norm of each edit and relative drift of each edited layer.",
         plot_norm_growth(norms, folder / "compare-norm-growth.png",
                          title="campaigns compared: norm growth against edits applied")),
    ]  # fmt: skip


def write_report(
    campaign_dir: Where, *, out: Where | None = None, compare: Sequence[Where] = ()
) -> Location:
    """Write `index.html` and its PNGs into `out` (default `<campaign>/report`): the
    plots of `campaign_dir` (commands.CAMPAIGN_PLOTS), and with `compare` the plots of
    compare_plots; the summary table has one row per campaign. A training directory
    (`seqedit train`) gets its learning curves instead (`train_report`)."""
    root = location(campaign_dir)
    others = [location(c) for c in compare]
    folder = location(out) if out is not None else root / "report"
    if is_training_dir(root):  # `seqedit train`'s output: its learning curves
        if others:
            raise QueryError(f"{root}: a training directory is reported alone (no --compare)")
        return write_train_report(root, folder)
    folder.mkdir()
    campaigns = [root, *others]
    summaries = [campaign_summary(c) for c in campaigns]
    images: list[tuple[str, Location]] = []
    with contextlib.suppress(ValueError):  # nothing finished yet: the table says so
        images += campaign_plots(root, folder / "degradation.png")
    if others:
        images += compare_plots(_by_name(summaries, campaigns), folder)
    head = "".join(f"<th>{html.escape(label)}</th>" for label in COLUMNS.values())
    body = "".join(
        "<tr>" + "".join(f"<td>{_cell(s.get(key))}</td>" for key in COLUMNS) + "</tr>"
        for s in summaries
    )
    figures = "".join(
        f'<figure><img src="{html.escape(p.name)}" alt="{html.escape(caption)}">'
        f"<figcaption>{html.escape(caption)} ({html.escape(p.name)})</figcaption></figure>"
        for caption, p in images
    )
    title = html.escape(f"seqedit report: {summaries[0]['campaign']}")
    page = (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{title}</title>"
        "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}"
        "img{max-width:100%}figure{margin:1.5em 0}</style></head><body>"
        f"<h1>{title}</h1><table><tr>{head}</tr>{body}</table>{figures}"
        "<p>Metric definitions: docs/architecture.md; queries: docs/sql-cookbook.md.</p>"
        "</body></html>\n"
    )
    return (folder / "index.html").write_text(page)
