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

from seqedit.pipeline.campaign_dir.state import CampaignState
from seqedit.pipeline.cli.main import main
from seqedit.pipeline.results.views import query
from seqedit.pipeline.run.submit import recorded_job
from seqedit.storage import location
from tests.pipeline.specs import write_spec

BIN = Path(sys.executable).parent
ENV = {**os.environ, "RAY_AUTH_MODE": "disabled", "PATH": f"{BIN}:{os.environ['PATH']}"}
"""The cluster's and the CLI's environment. Every Ray client here runs in its own process:
Ray caches its authentication mode per process, so a test that joined this cluster would
leave the pytest process unable to start the embedded Ray of later tests."""
ENV.pop("RAY_ADDRESS", None)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


CLIENT_PORT = _free_port()


def seqedit(*args: str) -> subprocess.CompletedProcess[str]:
    """`seqedit ARGS` in its own process, against the test cluster's environment."""
    return subprocess.run([str(BIN / "seqedit"), *args], env=ENV, capture_output=True,
                          text=True, timeout=600)  # fmt: skip


def _ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


@pytest.fixture(scope="module")
def job_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A one-node Ray cluster with its dashboard (the job server) and a Ray Client server
    (at CLIENT_PORT); the job server's address."""
    port = _free_port()
    subprocess.run([str(BIN / "ray"), "start", "--head", "--num-cpus=2", f"--port={_free_port()}",
                    "--include-dashboard=true", f"--dashboard-port={port}",
                    f"--ray-client-server-port={CLIENT_PORT}", "--disable-usage-stats"],
                   env=ENV, check=True, capture_output=True,
                   cwd=tmp_path_factory.mktemp("head"), timeout=180)  # fmt: skip
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        subprocess.run([str(BIN / "ray"), "stop", "--force"], env=ENV, capture_output=True,
                       timeout=120)  # fmt: skip


@pytest.mark.slow
def test_submit_follow_rerun_and_cancel_a_campaign_on_a_cluster(
    job_server: str, tiny_testbed: Path, tiny_stats: Path, tmp_path: Path, s3_root: str
) -> None:
    spec = write_spec(tmp_path, tiny_testbed, tiny_stats, n_edits=4, shard_size=2, eval_every=2)
    campaign = str(location(s3_root) / "c")  # the job's driver writes it to S3
    out = _ok(seqedit("submit", str(spec), "--out", campaign, "--address", job_server,
                      "--wait"))  # fmt: skip
    assert "SUCCEEDED" in out and f"campaign t: done -> {campaign}" in out  # the job's log
    assert CampaignState.load(campaign).status == "done"
    assert f"at {job_server}: SUCCEEDED" in _ok(seqedit("status", campaign))
    assert "campaign t: done" in _ok(seqedit("logs", campaign))

    _ok(seqedit("rerun", campaign, "--shard", "1", "--address", job_server, "--wait"))
    state = CampaignState.load(campaign)
    assert state.status == "done" and state.shards[1].attempt == 1  # ran again, on the cluster

    long_spec = tmp_path / "long"
    long_spec.mkdir()
    spec = write_spec(long_spec, tiny_testbed, tiny_stats, n_edits=40)
    _ok(seqedit("submit", str(spec), "--out", str(tmp_path / "long-c"), "--address",
                job_server))  # fmt: skip
    job = recorded_job(tmp_path / "long-c")
    deadline = time.monotonic() + 120
    while "RUNNING" not in _ok(seqedit("status", str(tmp_path / "long-c"))).splitlines()[0]:
        assert time.monotonic() < deadline, "the job never started"
        time.sleep(0.5)
    assert "stopping" in _ok(seqedit("cancel", str(tmp_path / "long-c")))
    while True:
        first = _ok(seqedit("status", str(tmp_path / "long-c"))).splitlines()[0]
        if "STOPPED" in first or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert first == f"job {job.job_id} at {job_server}: STOPPED"


@pytest.mark.slow
@pytest.mark.parametrize("address", ["auto", f"ray://127.0.0.1:{CLIENT_PORT}"])
def test_submit_with_the_driver_here_and_the_actors_on_the_cluster(
    job_server: str, address: str, tiny_testbed: Path, tiny_stats: Path, tmp_path: Path
) -> None:
    spec = write_spec(tmp_path, tiny_testbed, tiny_stats, n_edits=2)
    _ok(seqedit("submit", str(spec), "--out", str(tmp_path / "c"), "--address", address,
                "--quiet"))  # fmt: skip
    assert CampaignState.load(tmp_path / "c").status == "done"
    nodes = query(tmp_path / "c", "SELECT DISTINCT node FROM edits").to_pylist()
    head = subprocess.run(
        [sys.executable, "-c", "import ray; ray.init(address='auto', logging_level='ERROR'); "
         "print(ray.get_runtime_context().get_node_id())"],
        env=ENV, capture_output=True, text=True, timeout=120, check=True,
    ).stdout.strip().splitlines()[-1]  # fmt: skip
    assert [r["node"] for r in nodes] == [head]  # the editor ran on the cluster's node


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
