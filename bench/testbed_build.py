"""The default testbed builds of `make demo` and the guide: top-1 recall and build time.

    .venv/bin/python bench/testbed_build.py [--data ../shared/data] [--out runs/bench-testbed]

Builds, with the default configuration (no flags), the synthetic-300 testbed (seed 0) and
a testbed of the first 300 records of `counterfact_dev.json` (by default a language model:
English from ../shared beside the facts), and prints one line each: facts, steps trained,
top-1 recall and seconds. Exits 1 when a build's recall is under 90 % (the shipped
defaults must teach their facts). The builds take about 1.5 and 5 minutes on the 2-core
machine, which is why this is a benchmark and not a unit test.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from seqedit.testbed.build import TestbedReport, build_synthetic_testbed
from seqedit.testbed.dataset import build_dataset_testbed

MIN_RECALL = 0.9


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=Path("../shared/data"))
    parser.add_argument("--out", type=Path, default=Path("runs/bench-testbed"))
    args = parser.parse_args()
    dev = args.data / "counterfact_dev.json"
    if not dev.is_file():
        raise SystemExit(f"{dev}: missing (the shared dev data; see ../shared/data/SOURCES.md)")
    builds = {
        "synthetic-300": lambda: build_synthetic_testbed(args.out / "synthetic-300", 300, 0),
        "counterfact-300": lambda: build_dataset_testbed(
            args.out / "counterfact-300", dev, limit=300
        ),
    }
    failed = []
    for name, build in builds.items():
        started = time.perf_counter()
        report: TestbedReport = build()
        seconds = time.perf_counter() - started
        verdict = "ok" if report.recall >= MIN_RECALL else f"UNDER {MIN_RECALL:.0%}"
        print(f"{name:16} {report.n_facts:4d} facts  {report.steps:5d} steps  "
              f"recall {report.recall:6.1%}  {seconds:6.1f}s  {verdict}", flush=True)  # fmt: skip
        if report.recall < MIN_RECALL:
            failed.append(name)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
