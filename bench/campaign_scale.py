"""A 10,000-edit campaign on the synthetic testbed: does a long campaign stay flat?

    .venv/bin/python bench/campaign_scale.py [--edits 10000] [--method rome] [--block 500]
        [--shard-size 500] [--out runs/bench-scale]

One campaign through the real pipeline: a Ray editor actor, the default health schedule
(per-edit checks, periodic checks every 100 edits with held-out perplexity), shards with
checkpoints, Parquet rows. The model is the synthetic-300 testbed of `make demo`; the
requests are a separate synthetic world of `--edits` facts (seed 1), so almost every
subject is new to the model and its target_true is the world's fact, not a belief the
model was trained on. Prints, from measurements of this run only:

- seconds per edit in the first and the last block of edits and their ratio (the first
  block is the baseline: growth with the edit count shows as a ratio above 1);
- peak resident memory (VmRSS from /proc, sampled after every edit) of the editor
  process and of the driver, per block;
- time spent in health checks (per-edit verification, drift and undo snapshot, plus the
  periodic checks) as a share of the edit phase;
- the degradation table, by 1,000 edits, in DuckDB SQL over the campaign's tables.

Linux only (/proc). Writes `summary.json` beside the campaign.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import pyarrow as pa
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from seqedit.pipeline.campaign_dir.state import CampaignState
from seqedit.pipeline.cli.commands import progress_bar
from seqedit.pipeline.cli.prepared import (
    TESTBED_HPARAMS,
    ensure_stats,
    ensure_testbed,
    write_heldout,
)
from seqedit.pipeline.results.tables_format import format_table
from seqedit.pipeline.results.views import query
from seqedit.pipeline.run.driver import run_campaign
from seqedit.schemas.campaign import load_spec
from seqedit.testbed.world import synthetic_world

N_FACTS, SEED, WORLD_SEED = 300, 0, 1
HPARAMS = TESTBED_HPARAMS


def rss_kib(pid: int | str) -> int:
    """Resident set size of a process now, KiB (0 when it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError):
        pass
    return 0


class Sampler:
    """Progress callback: the wall time after every edit and the RSS of editor and driver."""

    def __init__(self, campaign: Path, n_edits: int, update: object) -> None:
        self.campaign, self.update = campaign, update
        self.times = [0.0] * (n_edits + 1)  # times[i]: after edit i (times[0]: start)
        self.editor_kib = [0] * (n_edits + 1)
        self.driver_kib = [0] * (n_edits + 1)
        self.pid: int | None = None
        self.times[0] = time.perf_counter()

    def __call__(self, done: int, total: int) -> None:
        self.times[done] = time.perf_counter()
        if self.pid is None or done % 100 == 0:  # a retried shard has a new editor
            state = CampaignState.load(self.campaign)
            running = [s for s in state.shards if s.status == "running"]
            self.pid = (running[0] if running else state.shards[0]).worker_pid
        self.editor_kib[done] = rss_kib(self.pid or 0)
        self.driver_kib[done] = rss_kib("self")
        self.update(done, total)  # type: ignore[operator]


def block_table(sampler: Sampler, n: int, block: int) -> list[dict[str, object]]:
    """Per block of `block` edits: s/edit (from the previous block's end; the first block
    from edit 1, so start-up is not counted) and peak RSS of editor and driver."""
    rows = []
    for start in range(0, n, block):
        stop = min(start + block, n)
        first = max(start, 1)
        seconds = (sampler.times[stop] - sampler.times[first]) / (stop - first)
        rows.append({
            "edits": f"{start + 1}-{stop}",
            "s_per_edit": round(seconds, 4),
            "editor_peak_mib": round(max(sampler.editor_kib[start + 1 : stop + 1]) / 1024, 1),
            "driver_peak_mib": round(max(sampler.driver_kib[start + 1 : stop + 1]) / 1024, 1),
        })  # fmt: skip
    return rows


DEGRADATION_SQL = """
WITH blocks AS (
    SELECT step // {k} AS b,
           avg(success::INT) FILTER (WHERE NOT rolled_back) AS immediate_es,
           median(p_new_after) AS median_p_new,
           count(*) FILTER (WHERE rolled_back) AS rolled_back,
           max(step) AS last_step
    FROM edits GROUP BY 1
), final AS (
    SELECT edit_step // {k} AS b, avg(es) AS final_es, avg(ps) AS final_ps, avg(ns) AS final_ns
    FROM evals WHERE protocol = 'final' GROUP BY 1
)
SELECT (b * {k} + 1) || '-' || (last_step + 1) AS edits,
       round(immediate_es, 3) AS immediate_es, median_p_new, rolled_back,
       round(retention, 3) AS retention_at_end, round(locality_kl, 3) AS locality_kl,
       round(locality_top1, 3) AS locality_top1, round(perplexity_ratio, 3) AS ppl_ratio,
       round(weight_drift, 3) AS weight_drift,
       round(final_es, 3) AS final_es, round(final_ps, 3) AS final_ps,
       round(final_ns, 3) AS final_ns
FROM blocks
LEFT JOIN periodic ON periodic.step = (
    SELECT max(step) FROM periodic p2 WHERE p2.step <= blocks.last_step)
LEFT JOIN final USING (b)
ORDER BY b
"""

HEALTH_SECONDS_SQL = """
SELECT (SELECT sum(check_seconds) FROM edits) AS per_edit,
       (SELECT sum(seconds) FROM health) AS periodic,
       (SELECT sum(seconds) FROM edits) AS editor_edit_seconds
"""


def prepare(out: Path, n_edits: int, method: str, shard_size: int, on_trend: str) -> Path:
    """Testbed, stats, requests, held-out text and the campaign spec; the spec's path."""
    model = out / "testbed"
    ensure_testbed(model, N_FACTS, SEED)
    layers = HPARAMS[method].get("layers") or [HPARAMS[method]["layer"]]
    stats = ensure_stats(out / "stats", model, layers)
    requests = out / f"requests-{n_edits}.jsonl"
    if not requests.is_file():
        world = synthetic_world(n_edits, WORLD_SEED)
        with requests.open("w", encoding="utf-8") as handle:
            handle.writelines(r.model_dump_json() + "\n" for r in world)
    heldout = write_heldout(out / "heldout.jsonl", SEED)
    spec = {
        "name": f"scale-{method}-{n_edits}-{on_trend}",
        "model": "testbed",
        "dataset": {"path": requests.name},
        "method": method,
        "hparams": HPARAMS[method],
        "stats": stats.name,
        "n_edits": n_edits,
        "shard_size": shard_size,
        "resources": {"torch_threads": 1},
        # the default schedule; `on_trend` record lets a collapsing campaign run to the end
        "health": {"heldout": heldout.name, "on_trend": on_trend},
    }
    path = out / f"scale-{method}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--edits", type=int, default=10_000)
    parser.add_argument("--method", default="rome", choices=sorted(HPARAMS))
    parser.add_argument("--block", type=int, default=500, help="edits per timing block")
    parser.add_argument("--shard-size", type=int, default=500)
    parser.add_argument("--out", type=Path, default=Path("runs/bench-scale"))
    parser.add_argument(
        "--on-trend",
        default="record",
        choices=["record", "stop"],
        help="trend policy: record (default here: run all edits and record the collapse) "
        "or stop (the campaign default: stop at the last healthy state)",
    )
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    path = prepare(args.out, args.edits, args.method, args.shard_size, args.on_trend)
    spec = load_spec(path)
    campaign = args.out / spec.name
    shutil.rmtree(campaign, ignore_errors=True)
    started = time.perf_counter()
    with progress_bar(spec.n_edits, spec.name, True) as update:
        sampler = Sampler(campaign, spec.n_edits, update)
        state = run_campaign(spec, campaign, progress=sampler)
    total = time.perf_counter() - started
    reached = max(i for i, t in enumerate(sampler.times) if t > 0)  # < n_edits after a stop
    edit_phase = sampler.times[reached] - sampler.times[0]

    blocks = block_table(sampler, reached, args.block)
    print(format_table(pa.Table.from_pylist(blocks)))
    health = query(campaign, HEALTH_SECONDS_SQL).to_pylist()[0]
    health_seconds = (health["per_edit"] or 0.0) + (health["periodic"] or 0.0)
    summary = {
        "campaign": spec.name,
        "status": state.status,
        "edits": spec.n_edits,
        "edits_reached": reached,
        "stopped_because": next((s.error for s in state.shards if s.status == "stopped"), None),
        "first_block_s_per_edit": blocks[0]["s_per_edit"],
        "last_block_s_per_edit": blocks[-1]["s_per_edit"],
        "ratio_last_to_first": round(blocks[-1]["s_per_edit"] / blocks[0]["s_per_edit"], 3),
        "editor_peak_mib_first_block": blocks[0]["editor_peak_mib"],
        "editor_peak_mib_last_block": blocks[-1]["editor_peak_mib"],
        "driver_peak_mib_first_block": blocks[0]["driver_peak_mib"],
        "driver_peak_mib_last_block": blocks[-1]["driver_peak_mib"],
        "edit_phase_seconds": round(edit_phase, 1),
        "total_seconds": round(total, 1),
        "health_seconds_per_edit_checks": round(health["per_edit"] or 0.0, 1),
        "health_seconds_periodic": round(health["periodic"] or 0.0, 1),
        "health_share_of_edit_phase": round(health_seconds / edit_phase, 4),
    }
    print(json.dumps(summary, indent=1))
    print(f"degradation by {min(1000, spec.n_edits)} edits (DuckDB over {campaign}):")
    sql = DEGRADATION_SQL.format(k=min(1000, spec.n_edits))
    print(format_table(query(campaign, sql)))
    (args.out / "summary.json").write_text(json.dumps({**summary, "blocks": blocks}, indent=1))


if __name__ == "__main__":
    main()
