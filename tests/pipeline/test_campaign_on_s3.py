"""A campaign whose directory and stats live on S3 (a local moto server): run, killed,
status, rerun, query, report, compact; the rows equal a local run's, and nothing of the
campaign is written to local disk."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from seqedit.pipeline.campaign_dir import lock as campaign_lock
from seqedit.pipeline.campaign_dir.compact import CompactError, compact
from seqedit.pipeline.campaign_dir.lock import CampaignBusyError, Lease, driver_lock, driver_running
from seqedit.pipeline.campaign_dir.state import CampaignState, ShardState
from seqedit.pipeline.cli.main import main
from seqedit.pipeline.results.report import write_report
from seqedit.pipeline.run.driver import run_campaign
from seqedit.schemas.campaign import load_spec
from seqedit.storage import Location, location
from tests.pipeline.test_campaign_integration import FAULT_HEALTH, _spec, assert_same_rows


def _upload(folder: Path, target: Location) -> None:
    """Copy a local folder's files (one level of subfolders) to `target`."""
    for entry in folder.rglob("*"):
        if entry.is_file():
            (target / str(entry.relative_to(folder))).write_bytes(entry.read_bytes())


def _wait_for_step(campaign: str, shard: int, after_steps: int, driver: subprocess.Popen) -> None:
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if driver.poll() is not None:
            raise RuntimeError(f"the campaign process exited early ({driver.returncode})")
        try:
            current: ShardState | None = CampaignState.load(campaign).shards[shard]
        except (FileNotFoundError, ValueError):
            current = None
        if current is not None and current.steps_done >= after_steps:
            return
        time.sleep(0.05)
    raise TimeoutError(f"shard {shard} did not reach step {after_steps}")


@pytest.mark.extended  # the local kill/rerun tests and test_submit's campaign on S3 cover
# its parts in CI; this adds the two together (make test-extended)
def test_a_killed_campaign_on_s3_reruns_to_the_local_result(
    ray_local: None,
    tiny_testbed: Path,
    tiny_stats: Path,
    tmp_path: Path,
    s3_root: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    stats = location(s3_root) / "stats"
    _upload(tiny_stats, stats)
    spec_file = _spec(tmp_path, tiny_testbed, tiny_stats, health=FAULT_HEALTH)
    reference = run_campaign(load_spec(spec_file), tmp_path / "reference")
    (tmp_path / "s3").mkdir()
    s3_spec = _spec(tmp_path / "s3", tiny_testbed, tiny_stats, health=FAULT_HEALTH)
    s3_spec.write_text(s3_spec.read_text().replace(str(tiny_stats), str(stats)))
    campaign = str(location(s3_root) / "campaign")
    workdir = tmp_path / "cwd"
    workdir.mkdir()

    driver = subprocess.Popen(
        [sys.executable, "-m", "seqedit.pipeline.cli", "run", str(s3_spec), "--out", campaign,
         "--quiet"],
        start_new_session=True, cwd=workdir, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        _wait_for_step(campaign, shard=1, after_steps=3, driver=driver)
        assert driver_running(campaign)  # its lease on S3 is live
        with pytest.raises(CampaignBusyError, match="is running this campaign"):
            run_campaign(load_spec(s3_spec), campaign)
    finally:
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait(timeout=60)
    assert list(workdir.iterdir()) == []  # the campaign went to S3 only
    assert main(["status", campaign]) == 0
    assert "interrupted" in capsys.readouterr().out  # the dead driver's lease is not live

    assert main(["rerun", campaign, "--quiet"]) == 0
    capsys.readouterr()
    state = CampaignState.load(campaign)
    assert state.status == "done" and state.shards[1].attempt == 1
    assert [s.weights_fingerprint for s in state.shards] == [
        s.weights_fingerprint for s in reference.shards
    ]
    assert_same_rows(campaign, tmp_path / "reference")  # type: ignore[arg-type]
    assert not (location(campaign) / campaign_lock.LOCK_FILE).exists()  # released

    assert main(["query", campaign, "SELECT count(*) AS n FROM edits", "--format", "csv"]) == 0
    assert capsys.readouterr().out.split() == ["n", "20"]
    page = write_report(campaign)
    assert page == location(campaign) / "report" / "index.html"
    assert (location(campaign) / "report" / "degradation.png").read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(CompactError, match="local and shared paths only"):
        compact(campaign)


def test_the_lease_refuses_a_second_driver_and_frees_a_dead_ones(
    s3_root: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(campaign_lock, "LEASE_SETTLE_S", 0.01)
    root = location(s3_root)
    with driver_lock(root):
        assert driver_running(root)
        with pytest.raises(CampaignBusyError, match=f"pid {os.getpid()} on"), driver_lock(root):
            pass
    assert not driver_running(root) and not (root / "driver.lock").exists()

    def lease(host: str, pid: int, age_s: float) -> None:
        held = Lease(owner="other", host=host, pid=pid, renewed_at=time.time() - age_s)
        (root / "driver.lock").write_text(held.model_dump_json())

    lease("another-host", 1, age_s=5)  # a driver elsewhere, renewing: refused
    assert driver_running(root)
    with pytest.raises(CampaignBusyError, match="pid 1 on another-host"), driver_lock(root):
        pass
    lease("another-host", 1, age_s=campaign_lock.LEASE_TTL_S + 1)  # not renewed: taken over
    assert not driver_running(root)
    with driver_lock(root):
        assert "other" not in (root / "driver.lock").read_text()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    lease(socket.gethostname(), int(dead.stdout), age_s=1)  # this host, process gone
    assert not driver_running(root)
