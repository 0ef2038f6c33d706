"""The opt-in early stop `early_stop_top1` (MPES in the ENCORE paper) on the CounterFact
language-model testbed: seconds per edit against ES/PS/NS over 100 sequential edits.

    .venv/bin/python bench/top1_counterfact.py --model runs/cf-testbed --stats runs/cf-testbed-stats
        [--methods rome,memit,alphaedit] [--edits 100]

The testbed is the default `seqedit testbed build --dataset ../shared/data/counterfact_dev.json
--limit 300` (docs/guide.md) with covariance of layers 0-3 (`seqedit stats build`, or the
stats a run of examples/testbed-counterfact-rome.yaml builds). Each method runs with the
hparams of its CounterFact example spec (bench/adapter_editing.py's `counterfact_hparams`),
one edit per step, `exact` (the reference's stop) and `top1` (early_stop_top1 on). ES is each
edit's success right after it (`immediate_es`) and ES/PS/NS of all edits after the last
(`final`); PS/NS right after each edit are `immediate_ps`/`immediate_ns`. Seconds per edit
count the edit call with the editor's own checks, not the scoring.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from adapter_editing import counterfact_hparams
from sequential_efficacy import run_method

from seqedit.pipeline.results.tables_format import format_table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--stats", type=Path, required=True)
    parser.add_argument("--methods", default="rome,memit,alphaedit")
    parser.add_argument("--edits", type=int, default=100)
    args = parser.parse_args()
    hparams = counterfact_hparams()
    rows = []
    for method in args.methods.split(","):
        base = None
        for config, top1 in (("exact", False), ("top1", True)):
            row = run_method(
                args.model,
                args.stats,
                method,
                {**hparams[method], "early_stop_top1": top1},
                args.edits,
                immediate=True,
            )
            base = base or row["s_per_edit"]
            row = {"config": config, **row, "speed_up": round(base / row["s_per_edit"], 2)}
            print(json.dumps(row), flush=True)
            rows.append(row)
    columns = ["method", "config", "s_per_edit", "speed_up", "immediate_es", "immediate_ps",
               "immediate_ns", "es", "ps", "ns"]  # fmt: skip
    print(format_table(pa.Table.from_pylist([{c: r[c] for c in columns} for r in rows])))


if __name__ == "__main__":
    main()
