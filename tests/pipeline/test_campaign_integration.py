"""End to end: a 20-edit ROME campaign through a Ray actor into Parquet, back out via DuckDB."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from seqedit.pipeline.campaign_dir.state import CampaignState, ShardState
from seqedit.pipeline.cli.commands import curve_sql
from seqedit.pipeline.cli.main import main
from seqedit.pipeline.results.views import query
from seqedit.pipeline.run.driver import CampaignDirError, run_campaign
from seqedit.schemas.campaign import CampaignSpec, load_spec
from seqedit.workers.editor import SequentialEditor
from tests.conftest import TINY_LAYER
from tests.pipeline.specs import write_spec

N_EDITS = 20


def _spec(tmp_path: Path, testbed: Path, stats: Path, **overrides: object) -> Path:
    defaults = {
        "name": "it-rome",
        "hparams": {"layer": TINY_LAYER, "context_template_length_params": [[5, 2]]},
        "n_edits": N_EDITS,
        "shard_size": 10,
        "eval_every": 10,
    }
    return write_spec(tmp_path, testbed, stats, **(defaults | overrides))


@pytest.mark.slow
def test_twenty_edit_campaign_through_ray_into_duckdb(
    ray_local: None, tiny_testbed: Path, tiny_stats: Path, tmp_path: Path
) -> None:
    spec = load_spec(_spec(tmp_path, tiny_testbed, tiny_stats))
    seen: list[int] = []
    state = run_campaign(spec, tmp_path / "c", progress=lambda done, total: seen.append(done))
    assert state.status == "done"
    assert seen == list(range(1, N_EDITS + 1))
    assert [s.status for s in CampaignState.load(tmp_path / "c").shards] == ["done", "done"]

    edits = query(tmp_path / "c", "SELECT * FROM edits ORDER BY step").to_pylist()
    assert [r["step"] for r in edits] == list(range(N_EDITS))
    assert len({r["case_id"] for r in edits}) == N_EDITS
    assert all(r["shard"] == r["step"] // 10 and r["attempt"] == 0 for r in edits)
    assert all(r["update_norm"] > 0 and r["seconds"] > 0 and r["opt_steps"] >= 1 for r in edits)
    drift = [r["weight_drift"] for r in edits]
    assert drift[-1] > drift[0] > 0

    evals = query(
        tmp_path / "c",
        "SELECT protocol, n_edits_applied, count(*) AS n, count(DISTINCT case_id) AS ids "
        "FROM evals GROUP BY ALL ORDER BY n_edits_applied",
    ).to_pylist()
    assert evals == [
        {"protocol": "retention", "n_edits_applied": 10, "n": 10, "ids": 10},
        {"protocol": "final", "n_edits_applied": 20, "n": 20, "ids": 20},
    ]
    curve = query(tmp_path / "c", curve_sql()).to_pylist()
    assert [row["n_edits_applied"] for row in curve] == [10, 20]
    assert all(0.0 <= row["ns"] <= 1.0 for row in curve)
    state = CampaignState.load(tmp_path / "c")
    replayed = SequentialEditor(
        str(tiny_testbed), "rome", spec.hparams, stats_dir=str(tiny_stats), campaign="replay"
    )
    for shard in state.shards:  # base model + edit log of shards 0..k = weights after shard k
        replayed.replay(load_file(tmp_path / "c" / "editlog" / f"shard={shard.index}.safetensors"))
        assert replayed.weights_fingerprint() == shard.weights_fingerprint
    method = json.loads((tmp_path / "c" / "method.json").read_text())
    templates = method["context"]["templates"]
    assert method["method"] == "rome" and templates[0] == "{}" and len(templates) == 3


@pytest.mark.slow
def test_campaign_dir_holding_another_spec_is_refused(
    ray_local: None, tiny_testbed: Path, tiny_stats: Path, tmp_path: Path
) -> None:
    first = load_spec(_spec(tmp_path, tiny_testbed, tiny_stats, n_edits=2, shard_size=None))
    run_campaign(first, tmp_path / "c")
    second = load_spec(_spec(tmp_path, tiny_testbed, tiny_stats, n_edits=3, shard_size=None))
    with pytest.raises(CampaignDirError, match="use another --out directory"):
        run_campaign(second, tmp_path / "c")


@pytest.mark.slow
def test_rerun_after_a_crash_resumes_from_the_checkpoint_identically(
    ray_local: None, tiny_testbed: Path, tiny_stats: Path, tmp_path: Path
) -> None:
    """A driver that died in shard 1 leaves it 'running'; running the campaign again starts
    a fresh editor, restores it from shard 0's checkpoint and redoes shard 1 as attempt 1:
    the same weights and metric values as the uninterrupted run, and no duplicate rows."""
    spec = load_spec(
        _spec(tmp_path, tiny_testbed, tiny_stats, method="alphaedit",
              hparams={"layers": [TINY_LAYER], "v_loss_layer": 3,
                       "context_templates": [["{}"]]})
    )  # fmt: skip
    done = run_campaign(spec, tmp_path / "c")
    before = query(tmp_path / "c", "SELECT step, p_new_after FROM edits ORDER BY step").to_pylist()

    crashed = CampaignState.load(tmp_path / "c")
    crashed.shards[1].status, crashed.shards[1].done_attempt = "running", None
    crashed.status = "running"
    crashed.save(tmp_path / "c")
    resumed = run_campaign(spec, tmp_path / "c")

    assert resumed.shards[1].attempt == 1 and resumed.shards[1].done_attempt == 1
    assert resumed.shards[1].weights_fingerprint == done.shards[1].weights_fingerprint
    after = query(tmp_path / "c", "SELECT step, p_new_after FROM edits ORDER BY step").to_pylist()
    assert after == before  # same values, 20 rows: attempt 0 of shard 1 is not visible
    evals = query(tmp_path / "c", "SELECT count(*) AS n FROM evals").to_pylist()
    assert evals == [{"n": 10 + 20}]


@pytest.mark.slow
def test_missing_checkpoint_is_a_clear_error(
    ray_local: None, tiny_testbed: Path, tiny_stats: Path, tmp_path: Path
) -> None:
    spec = load_spec(_spec(tmp_path, tiny_testbed, tiny_stats))
    run_campaign(spec, tmp_path / "c")
    crashed = CampaignState.load(tmp_path / "c")
    crashed.shards[1].status = "failed"
    crashed.save(tmp_path / "c")
    (tmp_path / "c" / "checkpoints" / "shard=0.safetensors").unlink()
    with pytest.raises(Exception, match=r"shard=0\.safetensors: unreadable checkpoint"):
        run_campaign(spec, tmp_path / "c")


FAULT_HEALTH = {"window": 4, "every": 5, "n_probes": 4, "n_retention": 4, "on_trend": "record"}
"""A trend window and periodic checks that straddle the shard boundary (shards of 10), whose
rows must come out the same after a restart; a trend below its threshold is recorded, not a
stop: these tests are about resuming, however well the tiny testbed edits on a given CPU."""


@pytest.fixture(scope="module")
def fault_reference(
    ray_local: None, tiny_testbed: Path, tiny_stats: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, CampaignState]:
    """The uninterrupted FAULT_HEALTH campaign the kill tests compare with, run once: its
    directory and final state."""
    root = tmp_path_factory.mktemp("fault-reference")
    spec = load_spec(_spec(root, tiny_testbed, tiny_stats, health=FAULT_HEALTH))
    return root / "reference", run_campaign(spec, root / "reference")


def assert_same_rows(campaign: Path, reference: Path) -> None:
    """Every table of `campaign` holds exactly the rows of `reference` (timings, attempt
    numbers and Ray node ids aside), and no (step, case) appears twice."""
    for table, key in (("edits", "step, case_id"),
                       ("evals", "protocol, n_edits_applied, case_id"),
                       ("health", "step, case_id, retry, check_name"),
                       ("model_evals", "protocol, n_edits_applied, metric")):  # fmt: skip
        timings = {"edits": ", seconds, check_seconds, node", "health": ", seconds",
                   "evals": ", node", "model_evals": ", seconds"}  # fmt: skip
        sql = f"SELECT * EXCLUDE (attempt{timings[table]}) FROM {table} ORDER BY {key}"
        rows = query(campaign, sql).to_pylist()
        assert rows == query(reference, sql).to_pylist(), table
        distinct = query(campaign, f"SELECT count(DISTINCT ({key})) AS n FROM {table}")
        assert distinct.to_pylist() == [{"n": len(rows)}], f"duplicate rows in {table}"


def _wait_for_step(
    campaign: Path, shard: int, after_steps: int, alive: subprocess.Popen | None = None
) -> ShardState:
    """Poll state.json until `shard` has done `after_steps` steps; its state then."""
    deadline = time.monotonic() + 900  # slow, busy machines too
    while time.monotonic() < deadline:
        if alive is not None and alive.poll() is not None:
            raise RuntimeError(f"the campaign process exited early ({alive.returncode})")
        try:
            current = CampaignState.load(campaign).shards[shard]
        except (FileNotFoundError, ValueError):
            current = None
        if current is not None and current.steps_done >= after_steps and current.worker_pid:
            return current
        time.sleep(0.005)
    raise TimeoutError(f"shard {shard} never reached step {after_steps}")


def _kill_editor_in_shard(campaign: Path, shard: int, after_steps: int) -> int:
    """Wait until `shard` has done `after_steps` steps, then SIGKILL its editor process."""
    pid = _wait_for_step(campaign, shard, after_steps).worker_pid
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    return pid


def run_with_editor_killed(
    spec: CampaignSpec, campaign: Path, *, shard: int, after_steps: int
) -> tuple[object, int]:
    """Run `spec` into `campaign`, SIGKILL its editor once `shard` has done `after_steps`
    steps; (the campaign's final state, the killed pid)."""
    outcome: dict[str, object] = {}
    runner = threading.Thread(target=lambda: outcome.update(state=run_campaign(spec, campaign)))
    runner.start()
    killed_pid = _kill_editor_in_shard(campaign, shard=shard, after_steps=after_steps)
    runner.join(timeout=900)
    return outcome.get("state"), killed_pid


@pytest.mark.slow
def test_killed_editor_is_retried_from_the_checkpoint_with_identical_results(
    fault_reference: tuple[Path, CampaignState], tiny_testbed: Path, tiny_stats: Path,
    tmp_path: Path,
) -> None:  # fmt: skip
    spec = load_spec(_spec(tmp_path, tiny_testbed, tiny_stats, health=FAULT_HEALTH))
    reference_dir, reference = fault_reference

    state, killed_pid = run_with_editor_killed(spec, tmp_path / "killed", shard=1, after_steps=3)
    assert isinstance(state, CampaignState) and state.status == "done"
    assert state.shards[0].attempt == 0 and state.shards[1].attempt == 1
    assert state.shards[1].worker_pid != killed_pid
    assert [s.weights_fingerprint for s in state.shards] == [
        s.weights_fingerprint for s in reference.shards
    ]
    assert_same_rows(tmp_path / "killed", reference_dir)


@pytest.mark.slow
def test_killed_driver_process_then_rerun_gives_the_uninterrupted_result(
    fault_reference: tuple[Path, CampaignState],
    tiny_testbed: Path,
    tiny_stats: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """`seqedit run` in its own process group (driver plus its embedded Ray) is killed
    mid-shard, as a crashed machine would be; `seqedit rerun` then finishes the campaign."""
    spec_file = _spec(tmp_path, tiny_testbed, tiny_stats, health=FAULT_HEALTH)
    reference_dir, reference = fault_reference
    campaign = tmp_path / "killed"
    driver = subprocess.Popen(
        [sys.executable, "-m", "seqedit.pipeline.cli", "run", str(spec_file),
         "--out", str(campaign), "--quiet"],
        start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        _wait_for_step(campaign, shard=1, after_steps=3, alive=driver)
        assert main(["status", str(campaign)]) == 0  # read while the driver runs
        shown = capsys.readouterr().out
        assert "campaign it-rome: running," in shown
        lines = {line.split()[0]: line.split() for line in shown.splitlines()[3:]}
        assert lines["0"][2] == "done" and lines["1"][2] == "running"
        done, total = lines["1"][4].split("/")
        assert 3 <= int(done) <= int(total) == 10
    finally:
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait(timeout=60)
    assert CampaignState.load(campaign).shards[1].status == "running"  # died mid-shard
    assert main(["status", str(campaign)]) == 0
    assert "interrupted" in capsys.readouterr().out  # no live driver holds the lock

    assert main(["rerun", str(campaign), "--quiet"]) == 0
    state = CampaignState.load(campaign)
    assert state.status == "done" and state.shards[1].attempt == 1
    assert [s.weights_fingerprint for s in state.shards] == [
        s.weights_fingerprint for s in reference.shards
    ]
    assert_same_rows(campaign, reference_dir)


COLLAPSE = {"layer": TINY_LAYER, "context_templates": ["{}"], "clamp_norm_factor": 1000,
            "v_weight_decay": 0, "v_lr": 100, "kl_factor": 0, "early_stop_loss": 0}  # fmt: skip


@pytest.mark.slow
def test_collapsing_campaign_is_stopped_at_the_last_healthy_state(
    ray_local: None, tiny_testbed: Path, tiny_stats: Path, tmp_path: Path
) -> None:
    """ROME with a wild learning rate and no clamp drives P(new) after each edit towards
    zero (the reported ROME collapse); the target_prob trend stops the campaign."""
    health = {"window": 4, "min_target_prob": 1e-3, "min_success_rate": None}
    spec = load_spec(_spec(tmp_path, tiny_testbed, tiny_stats, hparams=COLLAPSE, health=health))
    state = run_campaign(spec, tmp_path / "c")
    assert state.status == "stopped"
    stopped = next(s for s in state.shards if s.status == "stopped")
    assert stopped.error and "target_prob" in stopped.error
    assert all(s.status == "pending" for s in state.shards[stopped.index + 1 :])

    why_sql = (
        "SELECT step, value, threshold, action FROM health "
        "WHERE check_name = 'target_prob' AND NOT passed ORDER BY step"
    )
    why = query(tmp_path / "c", why_sql).to_pylist()
    assert why and why[0]["action"] == "stop" and why[0]["value"] < 1e-3
    last = query(tmp_path / "c", "SELECT step, rolled_back FROM edits ORDER BY step DESC "
                 "LIMIT 1").to_pylist()[0]  # fmt: skip
    assert last == {"step": why[0]["step"], "rolled_back": True}
    evals = query(tmp_path / "c", "SELECT max(n_edits_applied) AS n FROM evals").to_pylist()
    assert evals == [{"n": why[0]["step"]}]  # scored at the stop, without the rolled-back edit

    # the checkpoint is the last healthy state: replaying the log (rolled-back step marked)
    replayed = SequentialEditor(str(tiny_testbed), "rome", COLLAPSE,
                                stats_dir=str(tiny_stats), campaign="r")  # fmt: skip
    for shard in state.shards[: stopped.index + 1]:
        replayed.replay(load_file(tmp_path / "c" / "editlog" / f"shard={shard.index}.safetensors"))
    assert replayed.weights_fingerprint() == stopped.weights_fingerprint


@pytest.mark.slow
def test_skip_policy_rolls_every_oversized_edit_back(
    ray_local: None, tiny_testbed: Path, tiny_stats: Path, tmp_path: Path
) -> None:
    health = {"max_update_norm": 1e-9, "on_update_norm": "skip"}
    spec = load_spec(_spec(tmp_path, tiny_testbed, tiny_stats, n_edits=4, shard_size=None,
                           eval_every=None, health=health))  # fmt: skip
    state = run_campaign(spec, tmp_path / "c")
    assert state.status == "done"
    base = SequentialEditor(str(tiny_testbed), "rome", spec.hparams,
                            stats_dir=str(tiny_stats), campaign="b")  # fmt: skip
    assert state.shards[0].weights_fingerprint == base.weights_fingerprint()  # nothing kept
    rows = query(tmp_path / "c", "SELECT count(*) AS n, bool_and(rolled_back) AS all_back, "
                 "count(*) FILTER (WHERE check_name = 'update_norm' AND action = 'skip') AS skips "
                 "FROM edits JOIN health USING (step)").to_pylist()  # fmt: skip
    assert rows[0]["all_back"] and rows[0]["skips"] == 4


@pytest.mark.slow
def test_periodic_checks_record_retention_locality_and_drift_then_stop(
    ray_local: None, tiny_testbed: Path, tiny_stats: Path, tmp_path: Path
) -> None:
    health = {"every": 5, "n_probes": 8, "n_retention": 4, "max_locality_kl": 0.0}
    spec = load_spec(_spec(tmp_path, tiny_testbed, tiny_stats, health=health))
    state = run_campaign(spec, tmp_path / "c")
    assert state.status == "done"  # on_periodic defaults to record
    sql = ("SELECT step, check_name, value, passed, action FROM health WHERE check_name IN "
           "('retention', 'locality_kl', 'locality_top1') ORDER BY step, check_name")  # fmt: skip
    rows = query(tmp_path / "c", sql).to_pylist()
    assert sorted({r["step"] for r in rows}) == [4, 9, 14, 19]
    kl = [r["value"] for r in rows if r["check_name"] == "locality_kl"]
    assert kl[0] > 0 and all(0 <= r["value"] <= 1 for r in rows if r["check_name"] != "locality_kl")
    over = [r for r in rows if r["check_name"] == "locality_kl"]
    assert all(not r["passed"] and r["action"] == "record" for r in over)
    drift = query(tmp_path / "c", "SELECT count(*) AS n FROM health WHERE check_name = "
                  f"'weight_drift.transformer.h.{TINY_LAYER}.mlp.c_proj'").to_pylist()  # fmt: skip
    assert drift == [{"n": 4}]
    timing_sql = (
        "SELECT sum(seconds) FILTER (WHERE step % 5 = 4 AND check_name NOT IN "
        "('verified', 'success_rate', 'target_prob')) AS periodic, "
        "sum(seconds) FILTER (WHERE check_name = 'verified') AS per_edit FROM health"
    )
    timing = query(tmp_path / "c", timing_sql).to_pylist()[0]
    assert timing["periodic"] > 0 and timing["per_edit"] == 0

    stop = {"every": 5, "max_weight_drift": 1e-9, "on_periodic": "stop"}
    spec = load_spec(_spec(tmp_path, tiny_testbed, tiny_stats, name="stop", health=stop))
    state = run_campaign(spec, tmp_path / "s")
    assert state.status == "stopped" and "weight_drift" in (state.shards[0].error or "")
    edits = query(tmp_path / "s", "SELECT count(*) AS n, bool_or(rolled_back) AS back "
                  "FROM edits").to_pylist()  # fmt: skip
    assert edits == [{"n": 5, "back": False}]  # a periodic stop rolls nothing back
