"""`make demo`: the whole path on the embedded default, in a few minutes on a laptop CPU.

1. build (or reuse) a synthetic fact testbed: a tiny GPT-2 that knows N fictional facts;
2. compute (or reuse) the covariance of its edited layer over the facts' text;
3. run a sequential ROME campaign of E edits on local Ray, with a progress bar;
4. print efficacy/specificity against the number of edits applied (a DuckDB query);
5. write the degradation-curve and health PNGs and the HTML report (`seqedit report`).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import yaml

from seqedit.pipeline.cli.commands import curve_sql, plot_campaign, progress_bar
from seqedit.pipeline.cli.prepared import ensure_stats, ensure_testbed, write_heldout
from seqedit.pipeline.results.report import write_report
from seqedit.pipeline.results.tables_format import format_table
from seqedit.pipeline.results.views import query
from seqedit.pipeline.run.driver import run_campaign
from seqedit.schemas.campaign import load_spec

DEMO_LAYER = 0
# Tuned on this testbed (docs/methods.md): layer 0, and the bare prompt as the only context
# template (prefixes sampled from so small a model hurt: ES after 100 edits 0.81 -> 0.98).
DEMO_HPARAMS = {
    "layer": DEMO_LAYER,
    "v_num_grad_steps": 20,
    "v_lr": 0.5,
    "v_weight_decay": 0.5,
    "clamp_norm_factor": 4.0,
    "kl_factor": 0.0625,
    "mom2_adjustment": True,
    "context_templates": ["{}"],
}


def run_demo(out: Path, *, n_edits: int, n_facts: int, seed: int) -> None:
    """Run the demo end to end under `out` (reusing the testbed and stats when they match)."""
    out.mkdir(parents=True, exist_ok=True)
    model_dir = out / "testbed"
    report = ensure_testbed(model_dir, n_facts, seed, say=lambda m: print(f"[1/4] {m}"))
    stats_dir = ensure_stats(
        out / "stats", model_dir, [DEMO_LAYER], say=lambda m: print(f"[2/4] {m}")
    )
    spec_file = out / "campaign.yaml"
    spec_file.write_text(
        yaml.safe_dump(
            {
                "name": "demo-rome",
                "model": "testbed",
                "dataset": {"path": "testbed/requests.jsonl"},
                "method": "rome",
                "hparams": DEMO_HPARAMS,
                "stats": stats_dir.name,
                "n_edits": min(n_edits, report.n_facts),
                "eval_every": max(1, n_edits // 8),
                # scored beside the editor: each record right after its edit too, and the
                # generations of a few records per point for fluency
                "evaluation": {"immediate": True, "fluency_records": 5},
                "seed": seed,
                "health": {"heldout": write_heldout(out / "heldout.jsonl", seed).name},
            },
            sort_keys=False,
        )
    )
    spec = load_spec(spec_file)
    campaign_dir = out / "campaign"
    if campaign_dir.exists():
        shutil.rmtree(campaign_dir)
    print(f"[3/4] {spec.n_edits} sequential ROME edits on local Ray -> {campaign_dir}")
    with progress_bar(spec.n_edits, "editing", True) as update:
        run_campaign(spec, campaign_dir, progress=update)
    print("[4/4] efficacy / generalisation / specificity vs. edits applied (DuckDB):")
    print(format_table(query(campaign_dir, curve_sql())))
    for png in plot_campaign(campaign_dir, out / "degradation.png"):
        print(f"plot: {png}")
    print(f"report: {write_report(campaign_dir)}")
    print(f'query it: seqedit query {campaign_dir} "SELECT * FROM evals LIMIT 5"')
