"""The 10,000-edit CounterFact campaign: a testbed that knows the 10,000 records of
counterfact_edit_10k.json, then 10,000 sequential edits with ROME, MEMIT (batches of 100),
AlphaEdit (batches of 100) and FT-M, compared in one report.

    .venv/bin/python bench/counterfact_10k.py [--methods rome,memit,alphaedit,ft-m]
        [--runs runs] [--data ../shared/data/counterfact_edit_10k.json]

Every stage resumes: the testbed build from its training checkpoint, the covariance from
its finished shards, each campaign from its last checkpoint (run the script again after a
kill). The specs are examples/counterfact-10k-METHOD.yaml; their paths point at
runs/cf10k-testbed and runs/cf10k-stats-*, so `--runs` must be the checkout's runs/
folder unless the specs are copied. Each campaign's editor and evaluator are one-thread
actors, so on 2 cores two processes finish sooner: `--methods rome,alphaedit` and, once
runs/cf10k-stats-0 is built, `--methods memit,ft-m`; then a run with all four only
summarizes. Prints ES/PS/NS of all 10,000 records on the base model, then per method:
ES/PS/NS of all edits after the last one (protocol `final`), the retention curve, the
first step where the success-rate trend (last 50 edits) falls below 0.5, held-out
perplexity against the base model's, greedy generations and their n-gram entropy before
and after, and seconds per edit; then the published 10k figures on Llama3-8B beside them.
`seqedit report` writes the comparison page to RUNS/cf10k/report, with perplexity.png
(perplexity ratio against edits applied) beside it.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from seqedit.methods.fluency import fluency
from seqedit.methods.generation import generate_texts
from seqedit.pipeline.results.plots import log_y, plt, save
from seqedit.schemas.loaders import load_requests
from seqedit.workers.evaluator import evaluate_records
from seqedit.workers.model_io import load_model

ROOT = Path(__file__).resolve().parents[1]
SEQEDIT = str(Path(sys.executable).with_name("seqedit"))
METHODS = ("rome", "memit", "alphaedit", "ft-m")
PUBLISHED = {  # ES / PS / NS after 10,000 edits on Llama3-8B (ENCORE paper, Table 1)
    "alphaedit": (72.7, 63.4, 52.9),
    "memit": (49.7, 49.3, 51.3),
}
PROMPTS = ("The river", "A small house", "Music means", "The city of", "In the morning")


def run(*args: str) -> None:
    print("$", "seqedit", *args, flush=True)
    subprocess.run([SEQEDIT, *args], check=True)


def query(campaign: Path, sql: str) -> list[dict]:
    out = subprocess.run(
        [SEQEDIT, "query", str(campaign), sql, "--format", "json"],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    return json.loads(out.stdout)


def build_testbed(testbed: Path, data: Path) -> None:
    """The 10k testbed (default language-model build); a killed build resumes."""
    if (testbed / "testbed.json").is_file():
        return
    started = time.perf_counter()
    run("testbed", "build", "--dataset", str(data), "--out", str(testbed))
    print(f"testbed built in {time.perf_counter() - started:.0f} s this run", flush=True)


def run_campaign(method: str, out: Path) -> None:
    """One campaign; `seqedit run` on its existing directory resumes it."""
    spec = ROOT / "examples" / f"counterfact-10k-{method}.yaml"
    state = out / "state.json"
    if state.is_file() and all(
        shard["status"] == "done" for shard in json.loads(state.read_text())["shards"]
    ):
        return
    started = time.perf_counter()
    run("run", str(spec), "--out", str(out), "--quiet")
    print(f"{method}: {time.perf_counter() - started:.0f} s this run", flush=True)


def generations(model_dir: Path) -> tuple[list[str], float | None]:
    model, tokenizer = load_model(str(model_dir), device="cpu")
    texts = generate_texts(model, tokenizer, PROMPTS, max_new_tokens=24, top_k=1, generator=None)
    return texts, fluency(texts)


def base_scores(testbed: Path, out: Path) -> dict[str, float]:
    """ES/PS/NS of all 10,000 records on the unedited testbed (cached in `out`)."""
    if out.is_file():
        return json.loads(out.read_text())
    model, tokenizer = load_model(str(testbed), device="cpu")
    requests = load_requests(testbed / "requests.jsonl").requests
    rows = evaluate_records(model, tokenizer, requests, [0] * len(requests),
                            campaign="base", protocol="final", n_edits_applied=0)  # fmt: skip
    scores = {}
    for name in ("es", "ps", "ns"):  # records without paraphrases or neighbours have None
        values = [getattr(r, name) for r in rows if getattr(r, name) is not None]
        scores[name] = sum(values) / len(values)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(scores) + "\n")
    return scores


def summarize(method: str, campaign: Path, scratch: Path) -> dict:
    """The figures of one finished campaign (see the module docstring)."""
    final = query(campaign, "SELECT es, ps, ns FROM curves WHERE protocol = 'final'")[0]
    curve = query(
        campaign,
        "SELECT n_edits_applied AS n, es, ps, ns FROM curves "
        "WHERE protocol = 'retention' ORDER BY n",
    )
    collapse = query(
        campaign,
        "SELECT min(step) AS step FROM health WHERE check_name = 'success_rate' AND NOT passed",
    )[0]["step"]
    ppl = query(
        campaign,
        "SELECT (SELECT count(*) FROM edits e WHERE e.step <= p.step) AS n, p.perplexity, "
        "p.perplexity_ratio FROM periodic p ORDER BY p.step",
    )
    timing = query(campaign, "SELECT avg(seconds) AS s, count(*) AS n FROM edits")[0]
    last = query(campaign, "SELECT max(step) AS step FROM edits")[0]["step"]
    model_dir = scratch / f"{method}-final"
    if not (model_dir / "config.json").is_file():
        run("rebuild", str(campaign), "--step", str(last), "--out", str(model_dir))
    texts, entropy = generations(model_dir)
    return {
        "method": method, "final": final, "curve": curve, "collapse_step": collapse,
        "perplexity_ratio": ppl, "seconds_per_edit": timing["s"], "edits": timing["n"],
        "generations": texts, "fluency": entropy,
    }  # fmt: skip


def print_summary(
    rows: list[dict], base: dict[str, float], base_texts: list[str], base_fluency: float | None
) -> None:
    print(f"\nbase model: ES/PS/NS {base['es']:.3f}/{base['ps']:.3f}/{base['ns']:.3f}, "
          f"n-gram entropy {base_fluency:.3f}; {base_texts[2]!r}")  # fmt: skip
    print(f"\n{'method':<10} {'ES':>6} {'PS':>6} {'NS':>6} {'collapse':>9} "
          f"{'ppl x':>7} {'entropy':>8} {'s/edit':>7}   published ES/PS/NS")  # fmt: skip
    for row in rows:
        f, ppl = row["final"], row["perplexity_ratio"]
        published = "/".join(f"{v:.1f}" for v in PUBLISHED.get(row["method"], ())) or "-"
        print(
            f"{row['method']:<10} {f['es']:6.3f} {f['ps']:6.3f} {f['ns']:6.3f} "
            f"{row['collapse_step'] if row['collapse_step'] is not None else 'none':>9} "
            f"{ppl[-1]['perplexity_ratio'] if ppl else float('nan'):7.2f} "
            f"{row['fluency'] or float('nan'):8.3f} {row['seconds_per_edit']:7.3f}   {published}"
        )
    for row in rows:
        points = ", ".join(f"{p['n']}: {p['es']:.2f}/{p['ns']:.2f}" for p in row["curve"])
        print(f"\n{row['method']} retention ES/NS by edits applied: {points}")
        print(f"{row['method']} after all edits: {row['generations'][2]!r}")


def plot_perplexity(rows: list[dict], out: Path) -> None:
    """Held-out perplexity / the base model's against edits applied, one line per method."""
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    for row in rows:
        points = [(p["n"], p["perplexity_ratio"]) for p in row["perplexity_ratio"]]
        ax.plot(*zip(*points, strict=True), marker="o", markersize=3, label=row["method"])
    log_y(ax)
    ax.set_xlabel("edits applied (count)")
    ax.set_ylabel("held-out perplexity / base (ratio, log)")
    ax.set_title("Held-out English perplexity under 10,000 CounterFact edits")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    save(fig, out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--runs", type=Path, default=ROOT / "runs")
    parser.add_argument(
        "--data", type=Path, default=ROOT.parent / "shared" / "data" / "counterfact_edit_10k.json"
    )
    args = parser.parse_args()
    methods = [m for m in args.methods.split(",") if m]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        parser.error(f"unknown method(s) {unknown}; choose from {', '.join(METHODS)}")
    testbed, root = args.runs / "cf10k-testbed", args.runs / "cf10k"
    build_testbed(testbed, args.data)
    for method in methods:
        run_campaign(method, root / method)
    rows = [summarize(m, root / m, root / "models") for m in methods]
    base = base_scores(testbed, root / "base-scores.json")
    base_texts, base_fluency = generations(testbed)
    print_summary(rows, base, base_texts, base_fluency)
    campaigns = [str(root / m) for m in methods]
    run("report", campaigns[0], *(["--compare", *campaigns[1:]] if campaigns[1:] else []),
        "--out", str(root / "report"))  # fmt: skip
    plot_perplexity(rows, root / "report" / "perplexity.png")
    (root / "summary.json").write_text(json.dumps({"base": base, "methods": rows}, indent=1) + "\n")
    print(f"\nsummary: {root / 'summary.json'}")


if __name__ == "__main__":
    main()
