"""`seqedit train mend` as a Ray Train job on the tiny testbed: the train table, the best
checkpoint with its provenance, a rerun that resumes instead of starting over, and an early
stop that really stops."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from seqedit.pipeline.cli.main import main
from seqedit.pipeline.results.views import query
from seqedit.pipeline.run.driver import run_campaign
from seqedit.pipeline.run.train_job import EarlyStopping, StopState, TrainJob, run_train_job
from seqedit.schemas.campaign import load_spec
from seqedit.workers.mend_trainer import MendTrainingConfig
from tests.pipeline.specs import write_spec

CONFIG = {
    "batch_size": 4,
    "max_steps": 6,
    "val_every": 2,
    "last_blocks": 2,
    "network": {"rank": 8, "edit_lr": 0.1},
    "lr": 1e-3,
    "lr_lr": 1e-3,
}


def _data(tiny_testbed: Path, folder: Path) -> tuple[Path, Path]:
    lines = (tiny_testbed / "requests.jsonl").read_text().splitlines()
    train, val = folder / "train.jsonl", folder / "val.jsonl"
    train.write_text("\n".join(lines[:24]) + "\n")
    val.write_text("\n".join(lines[24:32]) + "\n")
    return train, val


def _table(out: Path) -> list[dict]:
    return pq.read_table(out / "train").to_pylist()


@pytest.mark.slow
def test_training_job_writes_table_and_best_and_resumes(
    ray_local: None, tiny_testbed: Path, tmp_path: Path
) -> None:
    train, val = _data(tiny_testbed, tmp_path)
    job = TrainJob(model=str(tiny_testbed), train=str(train), val=str(val),
                   out=str(tmp_path / "out"), config=MendTrainingConfig(**CONFIG))  # fmt: skip
    summary = run_train_job(job)
    out = Path(summary["out"])
    rows = _table(out)
    val_steps = sorted({r["step"] for r in rows if r["split"] == "val"})
    assert val_steps == [2, 4, 6]
    train_steps = sorted({r["step"] for r in rows if r["split"] == "train"})
    assert train_steps == [1, 2, 3, 4, 5, 6]  # each step once
    names = {r["name"] for r in rows if r["split"] == "val"}
    assert {"edit/acc", "loss/edit", "loss/loc", "loss/total", "acc/pre", "acc/post"} <= names
    best = json.loads((out / "best" / "provenance.json").read_text())
    assert best["step"] in val_steps and best["model_fingerprint"] and best["train_sha256"]
    assert (out / "best" / "editor.pt").is_file()
    _query_and_report(out, rows, best["step"])
    _campaign_edits_with_it(tiny_testbed, out, tmp_path)

    again = run_train_job(job)  # the same command again: resumes at the end, trains nothing
    assert _table(out) == rows
    assert again["best"] == summary["best"]


def _campaign_edits_with_it(testbed: Path, out: Path, tmp_path: Path) -> None:
    """`method: mend` with `checkpoint:` the training directory: a campaign's edits."""
    spec_file = write_spec(tmp_path, testbed, None, n_edits=2, method="mend",
                           hparams={"checkpoint": str(out), "last_blocks": 2})  # fmt: skip
    state = run_campaign(load_spec(spec_file), tmp_path / "campaign")
    assert state.status == "done"
    edits = query(tmp_path / "campaign", "SELECT method, update_norm FROM edits").to_pylist()
    assert [e["method"] for e in edits] == ["mend", "mend"]
    assert all(e["update_norm"] > 0 for e in edits)


def _query_and_report(out: Path, rows: list[dict], best_step: int) -> None:
    """`seqedit query` reads the train table and its curves view; `seqedit report` draws
    them with the best step."""
    curves = query(out, "SELECT * FROM train_curves WHERE split = 'val' ORDER BY step")
    wanted = {r["step"]: r["value"] for r in rows
              if r["split"] == "val" and r["name"] == "loss/total"}  # fmt: skip
    assert dict(zip(curves["step"].to_pylist(), curves["loss_total"].to_pylist(),
                    strict=True)) == wanted  # fmt: skip
    nll = [r["value"] for r in rows if r["split"] == "val" and r["name"] == "nll/post"]
    assert curves["perplexity_post"].to_pylist() == pytest.approx([math.exp(v) for v in nll])
    assert query(out, "SELECT count(*) AS n FROM train").to_pylist()[0]["n"] == len(rows)
    assert main(["report", str(out)]) == 0
    page = (out / "report" / "index.html").read_text()
    assert "training.png" in page and f"<th>best step</th><td>{best_step}</td>" in page
    assert (out / "report" / "training.png").stat().st_size > 10_000


@pytest.mark.slow
def test_early_stop_fires_and_keeps_the_best(
    ray_local: None, tiny_testbed: Path, tmp_path: Path
) -> None:
    """Watching the loss for a MAXIMUM while training lowers it: the run stops after
    `patience` validations without a new maximum, and the best kept is that maximum."""
    train, val = _data(tiny_testbed, tmp_path)
    job = TrainJob(
        model=str(tiny_testbed), train=str(train), val=str(val), out=str(tmp_path / "out"),
        config=MendTrainingConfig(**{**CONFIG, "max_steps": 20}),
        early_stopping=EarlyStopping(metric="loss/total", mode="max", patience=2),
    )  # fmt: skip
    summary = run_train_job(job)
    losses = {
        r["step"]: r["value"]
        for r in _table(Path(summary["out"]))
        if r["split"] == "val" and r["name"] == "loss/total"
    }
    best = max(losses, key=losses.__getitem__)
    assert summary["best"]["step"] == best and summary["best"]["value"] == losses[best]
    after_best = [step for step in losses if step > best]
    assert len(after_best) == 2  # patience: two validations without a new maximum, then stop
    assert max(losses) < 20  # it stopped before max_steps


@pytest.mark.slow
def test_two_ray_train_workers_give_one_workers_validation_curve(
    ray_local: None, tiny_testbed: Path, tmp_path: Path
) -> None:
    """The same global batch on 1 and on 2 data-parallel workers (half a CPU each, on this
    2-CPU Ray): every validation metric at every validation step agrees within 1e-4
    (relative; the gradient sums differ in float rounding only)."""
    train, val = _data(tiny_testbed, tmp_path)
    curves = {}
    for workers in (1, 2):
        job = TrainJob(model=str(tiny_testbed), train=str(train), val=str(val),
                       out=str(tmp_path / f"w{workers}"), workers=workers,
                       cpus_per_worker=1 / workers,
                       config=MendTrainingConfig(**CONFIG))  # fmt: skip
        rows = _table(Path(run_train_job(job)["out"]))
        assert {r["workers"] for r in rows} == {workers}
        measured = [r for r in rows if r["split"] == "val" and not r["name"].startswith("time/")]
        curves[workers] = {(r["step"], r["name"]): r["value"] for r in measured}
    assert curves[2].keys() == curves[1].keys() and len(curves[1]) >= 3 * 8
    for key, value in curves[1].items():
        assert curves[2][key] == pytest.approx(value, rel=1e-4, abs=1e-6), key


def test_stop_state_counts_checks_without_improvement() -> None:
    rule = EarlyStopping(metric="loss/total", mode="min", patience=2, min_delta=0.1)
    state = StopState()
    assert state.observe(1.0, 1, rule) and not state.stopped
    assert not state.observe(0.95, 2, rule)  # within min_delta: no improvement
    assert state.observe(0.5, 3, rule) and state.bad_checks == 0
    assert not state.observe(0.6, 4, rule) and not state.stopped
    assert not state.observe(0.7, 5, rule) and state.stopped and state.best_step == 3


def _final_val(out: Path) -> dict[str, float]:
    """The last validation's metrics (time/* left out) of a training directory."""
    rows = [r for r in _table(out) if r["split"] == "val" and not r["name"].startswith("time/")]
    last = max(r["step"] for r in rows)
    return {r["name"]: r["value"] for r in rows if r["step"] == last}


def _once_checkpointed(out: Path, kill: Callable[[], None]) -> threading.Thread:
    """A thread that calls `kill` once the job in `out` has written its first validation
    (its first checkpoint follows at once) and not its last."""

    def watch() -> None:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            if (out / "train" / "rows-000000002.parquet").is_file():
                time.sleep(1.0)  # the checkpoint is reported right after the rows
                kill()
                return
            time.sleep(0.05)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def _train_worker_pid() -> int:
    """The process of a Ray Train worker (Ray titles it "ray::RayTrainWorker...")."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
            try:
                title = cmdline.read_bytes()
            except OSError:
                continue
            if b"ray::RayTrainWorker" in title:
                return int(cmdline.parent.name)
        time.sleep(0.05)
    raise TimeoutError("no Ray Train worker process found")


@pytest.mark.extended  # SIGKILLs a Ray Train worker and a driver (make test-extended)
def test_a_killed_worker_and_a_killed_driver_resume_to_an_uninterrupted_runs_metrics(
    ray_local: None, tiny_testbed: Path, tmp_path: Path
) -> None:
    train, val = _data(tiny_testbed, tmp_path)

    fields = {**CONFIG, "max_steps": 12}  # long enough to be killed in the middle

    def job(out: str) -> TrainJob:
        return TrainJob(model=str(tiny_testbed), train=str(train), val=str(val),
                        out=str(tmp_path / out), config=MendTrainingConfig(**fields))  # fmt: skip

    reference = _final_val(Path(run_train_job(job("reference"))["out"]))

    killed = job("worker")  # a worker SIGKILLed after the first checkpoint: Ray Train
    victims: list[int] = []  # restarts the group from that checkpoint

    def kill_worker() -> None:
        victims.append(_train_worker_pid())
        os.kill(victims[-1], signal.SIGKILL)
        victims.append(int(time.time()))

    watcher = _once_checkpointed(Path(killed.out), kill_worker)
    summary = run_train_job(killed)
    watcher.join(timeout=5)
    last_part = Path(killed.out) / "train" / "rows-000000012.parquet"
    assert len(victims) == 2 and last_part.stat().st_mtime >= victims[1]  # killed mid-run
    assert _final_val(Path(summary["out"])) == pytest.approx(reference, rel=1e-5, abs=1e-7)
    assert sorted({r["step"] for r in _table(Path(summary["out"]))}) == list(range(1, 13))

    config = tmp_path / "train.yaml"  # the driver: `seqedit train` SIGKILLed, then again
    config.write_text(yaml.safe_dump(fields))
    command = [sys.executable, "-m", "seqedit.pipeline.cli", "train", "mend", "--model",
               str(tiny_testbed), "--train", str(train), "--val", str(val), "--out",
               str(tmp_path / "driver"), "--config", str(config)]  # fmt: skip
    driver = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    watcher = _once_checkpointed(tmp_path / "driver", lambda: driver.send_signal(signal.SIGKILL))
    driver.wait(timeout=900)
    watcher.join(timeout=5)
    assert driver.returncode == -signal.SIGKILL  # killed before it finished
    done = subprocess.run(command, capture_output=True, text=True, timeout=900, check=True)
    out = Path(json.loads(done.stdout)["out"])
    assert _final_val(out) == pytest.approx(reference, rel=1e-5, abs=1e-7)
    assert sorted({r["step"] for r in _table(out)}) == list(range(1, 13))  # each step once
