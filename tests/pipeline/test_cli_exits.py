"""How the command line ends: a user error is one line and exit status 2, a bug keeps its
traceback, and a reader that stops early (`| head -1`) ends it quietly with status 141."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from seqedit.pipeline.campaign_dir.state import CampaignState, ShardState
from seqedit.pipeline.cli import main as cli
from seqedit.pipeline.cli.main import main
from seqedit.schemas.campaign import CampaignSpec, DatasetSpec

SEQEDIT = [sys.executable, "-m", "seqedit.pipeline.cli"]


def _campaign(root: Path, n_shards: int) -> Path:
    """A campaign directory `seqedit status` can read: frozen spec and state, not run."""
    spec = CampaignSpec(name="c", model="m", dataset=DatasetSpec(path="requests.jsonl"),
                        n_edits=n_shards, shard_size=1)  # fmt: skip
    root.mkdir(parents=True)
    frozen = {"spec_hash": spec.spec_hash(), **spec.model_dump(mode="json")}
    (root / "spec.yaml").write_text(yaml.safe_dump(frozen, sort_keys=False))
    shards = [ShardState(index=i, start=i, stop=i + 1) for i in range(n_shards)]
    CampaignState(campaign="c", spec_hash=spec.spec_hash(), shards=shards).save(root)
    return root


def _quiet(stderr: str) -> bool:
    return not any(s in stderr for s in ("Broken pipe", "BrokenPipeError", "Traceback"))


def test_status_into_a_pipe_closed_before_it_writes(tmp_path: Path) -> None:
    campaign = _campaign(tmp_path / "c", 3)
    assert main(["status", str(campaign)]) == 0  # readable
    child = subprocess.Popen([*SEQEDIT, "status", str(campaign)], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)  # fmt: skip
    assert child.stdout is not None and child.stderr is not None
    child.stdout.close()  # the reader is gone before the command has written anything
    stderr = child.stderr.read()
    assert child.wait(timeout=300) == 141
    assert _quiet(stderr), stderr


def test_query_piped_into_head(tmp_path: Path) -> None:
    """More output than a pipe holds (64 KiB): `head` leaves while it is still written."""
    campaign = _campaign(tmp_path / "c", 1)
    sql = '"SELECT range AS n FROM range(100000)"'
    command = " ".join([*SEQEDIT, "query", str(campaign), sql, "--format", "csv", "| head -2"])
    done = subprocess.run(["bash", "-o", "pipefail", "-c", command], capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert (done.returncode, done.stdout) == (141, "n\n0\n")
    assert _quiet(done.stderr), done.stderr


def test_a_storage_error_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("x")
    assert main(["stats", "ls", str(not_a_folder)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"seqedit: error: {not_a_folder}: cannot list") and err.count("\n") == 1


def test_an_unknown_method_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump({"name": "t", "model": "m", "method": "romee", "n_edits": 1,
                                    "dataset": {"path": "r.jsonl"}}))  # fmt: skip
    assert main(["validate", str(spec), "--schema-only"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("seqedit: error: unknown method 'romee'") and "did you mean 'rome'" in err


def test_a_bug_keeps_its_traceback(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A torch/CUDA RuntimeError (or any exception that is no SeqeditError) propagates."""

    def broken(_args: object) -> None:
        raise RuntimeError("CUDA error: device-side assert triggered")

    monkeypatch.setattr(cli, "cmd_status", broken)
    with pytest.raises(RuntimeError, match="device-side assert"):
        main(["status", str(tmp_path)])
