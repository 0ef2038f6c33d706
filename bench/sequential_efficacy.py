"""100 sequential edits per method on the synthetic fact testbed: ES/PS/NS after all of them.

    .venv/bin/python bench/sequential_efficacy.py [--edits 100] [--facts 300] [--methods rome,...]
        [--set memit.mom2_update_weight=50] [--out runs/bench-efficacy]

Builds (or reuses) the synthetic-300 testbed of `make demo` and the covariance of its
layers 0-3, then for each method applies the first N requests in order with one
`SequentialEditor` and scores all N records once after the last edit (protocol "final":
the hard, honest one). Prints one table; `--set` overrides one hparam for a tuning run.
The hparams are each method's `testbed_hparams` (on its record), the ones docs/methods.md
reports.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from seqedit.pipeline.cli.prepared import TESTBED_HPARAMS, ensure_stats, ensure_testbed
from seqedit.pipeline.results.tables_format import format_table
from seqedit.testbed.build import load_testbed
from seqedit.workers.editor import SequentialEditor

N_FACTS, SEED, STATS_LAYERS = 300, 0, [0, 1, 2, 3]
HPARAMS = TESTBED_HPARAMS


def _testbed(out: Path, n_facts: int = N_FACTS) -> tuple[Path, Path]:
    model = out / ("testbed" if n_facts == N_FACTS else f"testbed-{n_facts}")
    ensure_testbed(model, n_facts, SEED)
    return model, ensure_stats(out / "stats", model, STATS_LAYERS)


def _override(hparams: dict[str, dict[str, Any]], assignment: str) -> None:
    key, _, value = assignment.partition("=")
    method, _, field = key.partition(".")
    if not field or method not in hparams:
        raise SystemExit(f"--set wants METHOD.FIELD=VALUE with METHOD in {sorted(hparams)}")
    hparams[method][field] = yaml.safe_load(value)


def run_method(
    model: Path,
    stats: Path | None,
    method: str,
    hparams: dict[str, Any],
    n: int,
    *,
    immediate: bool = False,
) -> dict:
    """Apply the first `n` testbed requests in order; score them all after the last edit.
    `immediate_es` is each edit's own success right after it; with `immediate`, PS and NS
    are scored there too (protocol "immediate"; not counted in s_per_edit)."""
    _, requests = load_testbed(model)
    stats_dir = str(stats) if stats else None
    editor = SequentialEditor(str(model), method, hparams, stats_dir=stats_dir, campaign=method)
    rows, right_after, edit_seconds = [], [], 0.0
    for step, request in enumerate(requests[:n]):
        started = time.perf_counter()
        rows.append(editor.edit(request, step))
        edit_seconds += time.perf_counter() - started
        if immediate:
            right_after += editor.evaluate([request], [step], protocol="immediate")
    evals = editor.evaluate(requests[:n], list(range(n)), protocol="final")

    def mean(field: str, rows: list = evals) -> float:
        values = [getattr(e, field) for e in rows if getattr(e, field) is not None]
        return round(statistics.fmean(values), 3)

    scored_right_after = (
        {f"immediate_{m}": mean(m, right_after) for m in ("ps", "ns")} if immediate else {}
    )
    return {
        "method": method,
        "edits": n,
        "es": mean("es"),
        "ps": mean("ps"),
        "ns": mean("ns"),
        **scored_right_after,
        "immediate_es": round(statistics.fmean(r.success for r in rows), 3),
        "s_per_edit": round(edit_seconds / n, 3),
        "drift": None if rows[-1].weight_drift is None else round(rows[-1].weight_drift, 3),
        "memory": rows[-1].memory_size,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--edits", type=int, default=100)
    parser.add_argument(
        "--facts", type=int, default=N_FACTS, help="facts of the synthetic testbed (>= --edits)"
    )
    parser.add_argument("--methods", default=",".join(HPARAMS))
    parser.add_argument("--set", action="append", default=[], metavar="METHOD.FIELD=VALUE")
    parser.add_argument("--out", type=Path, default=Path("runs/bench-efficacy"))
    args = parser.parse_args()
    hparams = {name: dict(fields) for name, fields in HPARAMS.items()}
    for assignment in args.set:
        _override(hparams, assignment)
    model, stats = _testbed(args.out, args.facts)
    results = []
    for method in args.methods.split(","):
        results.append(run_method(model, stats, method, hparams[method], args.edits))
        print(json.dumps({**results[-1], "hparams": hparams[method]}), flush=True)
    import pyarrow as pa

    print(format_table(pa.Table.from_pylist(results)))


if __name__ == "__main__":
    main()
