"""`seqedit submit / status / logs / cancel / rerun --address` against a Ray cluster with a
job server, started here with `ray start --head` (the way the cluster launcher starts it)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import ray

from seqedit.pipeline.cli import main
from seqedit.pipeline.state import CampaignState
from seqedit.pipeline.store import query
from seqedit.pipeline.submit import job_status, recorded_job
from tests.pipeline.specs import write_spec

BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


CLIENT_PORT = _free_port()


@pytest.fixture(scope="module")
def job_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A one-node Ray cluster with its dashboard (the job server) and a Ray Client server
    (at CLIENT_PORT); the job server's address."""
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PATH": f"{BIN}:{os.environ['PATH']}"}
    env.pop("RAY_ADDRESS", None)
    port = _free_port()
    subprocess.run([str(BIN / "ray"), "start", "--head", "--num-cpus=2", f"--port={_free_port()}",
                    "--include-dashboard=true", f"--dashboard-port={port}",
                    f"--ray-client-server-port={CLIENT_PORT}", "--disable-usage-stats"],
                   env=env, check=True, capture_output=True,
                   cwd=tmp_path_factory.mktemp("head"), timeout=180)  # fmt: skip
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        subprocess.run([str(BIN / "ray"), "stop", "--force"], env=env, capture_output=True,
                       timeout=120)  # fmt: skip


@pytest.mark.slow
def test_submit_follow_rerun_and_cancel_a_campaign_on_a_cluster(
    job_server: str, tiny_testbed: Path, tiny_stats: Path, tmp_path: Path,
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    spec = write_spec(tmp_path, tiny_testbed, tiny_stats, n_edits=4, shard_size=2, eval_every=2)
    campaign = tmp_path / "c"
    assert main(["submit", str(spec), "--out", str(campaign), "--address", job_server,
                 "--wait"]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert "SUCCEEDED" in out and f"campaign t: done -> {campaign}" in out  # the job's log
    assert CampaignState.load(campaign).status == "done"
    assert main(["status", str(campaign)]) == 0
    assert f"at {job_server}: SUCCEEDED" in capsys.readouterr().out
    assert main(["logs", str(campaign)]) == 0
    assert "campaign t: done" in capsys.readouterr().out

    assert main(["rerun", str(campaign), "--shard", "1", "--address", job_server,
                 "--wait"]) == 0  # fmt: skip
    state = CampaignState.load(campaign)
    assert state.status == "done" and state.shards[1].attempt == 1  # ran again, on the cluster

    long_spec = tmp_path / "long"
    long_spec.mkdir()
    spec = write_spec(long_spec, tiny_testbed, tiny_stats, n_edits=40)
    assert main(["submit", str(spec), "--out", str(tmp_path / "long-c"),
                 "--address", job_server]) == 0  # fmt: skip
    job = recorded_job(tmp_path / "long-c")
    deadline = time.monotonic() + 120
    while str(job_status(job)) != "RUNNING" and time.monotonic() < deadline:
        time.sleep(0.5)
    assert main(["cancel", str(tmp_path / "long-c")]) == 0
    while not job_status(job).is_terminal() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert str(job_status(job)) == "STOPPED"


@pytest.mark.slow
@pytest.mark.parametrize("address", ["auto", f"ray://127.0.0.1:{CLIENT_PORT}"])
def test_submit_with_the_driver_here_and_the_actors_on_the_cluster(
    job_server: str, address: str, tiny_testbed: Path, tiny_stats: Path, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")  # as the cluster was started
    before = os.environ.get("RAY_ADDRESS")
    spec = write_spec(tmp_path, tiny_testbed, tiny_stats, n_edits=2)
    try:
        assert main(["submit", str(spec), "--out", str(tmp_path / "c"), "--address", address,
                     "--quiet"]) == 0  # fmt: skip
        cluster_nodes = {n["NodeID"] for n in ray.nodes()}  # the driver joined the cluster
    finally:
        ray.shutdown()
    assert os.environ.get("RAY_ADDRESS") == before  # the process is left as it was
    assert CampaignState.load(tmp_path / "c").status == "done"
    nodes = query(tmp_path / "c", "SELECT DISTINCT node FROM edits").to_pylist()
    assert len(cluster_nodes) == 1 and {r["node"] for r in nodes} == cluster_nodes


def test_submit_without_a_server_is_one_clear_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    spec = tmp_path / "spec.yaml"
    spec.write_text("name: x\n")
    with socket.socket() as held:  # bound, never listening: connections are refused
        held.bind(("127.0.0.1", 0))
        nobody = f"http://127.0.0.1:{held.getsockname()[1]}"
        assert main(["submit", str(spec), "--out", str(tmp_path / "c"),
                     "--address", nobody]) == 2  # fmt: skip
    assert "Failed to connect to Ray" in capsys.readouterr().err
    assert main(["logs", str(tmp_path / "c")]) == 2
    assert "no job was submitted" in capsys.readouterr().err
