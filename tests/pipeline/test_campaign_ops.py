"""`seqedit validate` (and every shipped example spec), `seqedit status` and `seqedit rerun`."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import ray
import torch
from transformers import AutoModelForCausalLM

from seqedit.methods.config import HparamsError
from seqedit.pipeline.cli.campaign_ops import (
    frozen_spec,
    rebuild_model,
    rerun_campaign,
    validate_spec,
)
from seqedit.pipeline.cli.main import main
from seqedit.pipeline.run.driver import run_campaign
from seqedit.schemas.campaign import SpecError, load_spec
from seqedit.testbed.build import load_testbed
from seqedit.workers.editor import SequentialEditor
from tests.pipeline.specs import write_spec


@pytest.fixture(scope="module", autouse=True)
def _ray_down_after() -> Iterator[None]:
    """`seqedit run` starts an embedded Ray; leave none behind for other modules."""
    yield
    ray.shutdown()


EXAMPLES = sorted((Path(__file__).resolve().parents[2] / "examples").glob("*.yaml"))


def test_there_are_examples() -> None:
    assert len(EXAMPLES) >= 4


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.name)
def test_every_example_spec_validates(example: Path) -> None:
    spec = validate_spec(example, schema_only=True)
    assert spec.name == example.stem


def _spec(tmp_path: Path, testbed: Path, stats: Path | None, **overrides: object) -> Path:
    defaults = {"name": "ops", "n_edits": 6, "shard_size": 3}
    return write_spec(tmp_path, testbed, stats, **(defaults | overrides))


def _ran(tmp_path: Path, testbed: Path, stats: Path) -> Path:
    """The 6-edit campaign of `_spec`, run to the end by `seqedit run` into tmp_path/c."""
    campaign = tmp_path / "c"
    spec_file = _spec(tmp_path, testbed, stats)
    assert main(["run", str(spec_file), "--out", str(campaign), "--quiet"]) == 0
    return campaign


def _tamper(campaign: Path, shards: dict[int, dict[str, object]], **top: object) -> None:
    """Rewrite state.json as a crash or an older run would have left it."""
    state_file = campaign / "state.json"
    state = json.loads(state_file.read_text())
    for index, fields in shards.items():
        state["shards"][index].update(fields)
    state.update(top)
    state_file.write_text(json.dumps(state))


def test_validate_checks_model_data_and_stats(
    tiny_testbed: Path, tiny_stats: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    good = _spec(tmp_path, tiny_testbed, tiny_stats)
    assert main(["validate", str(good)]) == 0
    assert "ok (schema, hparams, model, data, stats)" in capsys.readouterr().out
    with pytest.raises(SpecError, match="field 'n_edits' is 1000"):
        validate_spec(_spec(tmp_path, tiny_testbed, tiny_stats, n_edits=1000, shard_size=None))
    with pytest.raises(SpecError, match="field 'model': no model directory"):
        validate_spec(_spec(tmp_path, tmp_path / "nowhere", tiny_stats))
    with pytest.raises(SpecError, match="field 'stats': method rome needs"):
        validate_spec(_spec(tmp_path, tiny_testbed, None))
    with pytest.raises(HparamsError, match="did you mean 'layer'"):
        validate_spec(_spec(tmp_path, tiny_testbed, tiny_stats, hparams={"layr": 0}))
    assert main(["validate", str(_spec(tmp_path, tiny_testbed, tiny_stats, method="romee"))]) == 2
    assert "did you mean 'rome'" in capsys.readouterr().err


@pytest.mark.slow
def test_status_and_rerun_of_a_failed_shard(
    tiny_testbed: Path, tiny_stats: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    campaign = _ran(tmp_path, tiny_testbed, tiny_stats)
    assert frozen_spec(campaign).n_edits == 6
    capsys.readouterr()

    _tamper(campaign, {1: {"status": "failed", "error": "RuntimeError('editor died')",
                           "steps_done": 1, "done_attempt": None}}, status="failed")  # fmt: skip
    shutil.rmtree(campaign / "tables" / "edits" / "shard=1")

    assert main(["status", str(campaign)]) == 0
    out = capsys.readouterr().out
    assert "campaign ops: failed, 4/6 steps" in out
    assert "failed" in out and "editor died" in out and "1/3" in out

    assert main(["rerun", str(campaign), "--quiet"]) == 0
    assert "campaign ops: done" in capsys.readouterr().out
    assert main(["status", str(campaign)]) == 0
    out = capsys.readouterr().out
    assert "done, 6/6 steps" in out and "failed" not in out
    assert main(["query", str(campaign), "SELECT count(*) AS n, max(attempt) AS a FROM edits",
                 "--format", "json"]) == 0  # fmt: skip
    assert '"n": 6' in capsys.readouterr().out
    assert main(["rerun", str(campaign), "--failed", "--quiet"]) == 2
    assert "no failed shard to rerun" in capsys.readouterr().err


@pytest.mark.extended  # in CI: rerun of a failed shard and of shards apart; this adds
# --failed stopping early, --shard staleness and repeats (make test-extended)
def test_rerun_failed_and_one_shard(
    tiny_testbed: Path, tiny_stats: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    campaign = _ran(tmp_path, tiny_testbed, tiny_stats)
    reference = json.loads((campaign / "state.json").read_text())["shards"]

    # shard 0 failed, shard 1 never ran: --failed reruns shard 0 and stops there
    _tamper(campaign, {
        0: {"status": "failed", "done_attempt": None, "error": "RuntimeError('x')"},
        1: {"status": "pending", "done_attempt": None, "weights_fingerprint": None},
    })  # fmt: skip
    assert main(["rerun", str(campaign), "--failed", "--quiet"]) == 0
    assert "campaign ops: pending" in capsys.readouterr().out
    shards = json.loads((campaign / "state.json").read_text())["shards"]
    assert [(s["status"], s["attempt"]) for s in shards] == [("done", 1), ("pending", 0)]
    assert shards[0]["weights_fingerprint"] == reference[0]["weights_fingerprint"]
    assert main(["rerun", str(campaign), "--shard", "5", "--quiet"]) == 2
    assert "no shard 5" in capsys.readouterr().err
    assert main(["rerun", str(campaign), "--quiet"]) == 0
    shards = json.loads((campaign / "state.json").read_text())["shards"]
    assert [s["weights_fingerprint"] for s in shards] == [
        s["weights_fingerprint"] for s in reference
    ]

    # --shard 0 of a done campaign: a new attempt of shard 0 only; same weights, so shard 1
    # stays done; a recorded fingerprint that differs makes shard 1 stale (pending)
    _tamper(campaign, {0: {"weights_fingerprint": "0" * 64}})
    assert main(["rerun", str(campaign), "--shard", "0", "--quiet"]) == 0
    shards = json.loads((campaign / "state.json").read_text())["shards"]
    assert [(s["status"], s["attempt"]) for s in shards] == [("done", 2), ("pending", 1)]
    assert "stale: shard 0 was rerun" in shards[1]["error"]
    capsys.readouterr()
    assert main(["query", str(campaign), "SELECT count(*) AS n FROM edits", "--format",
                 "json"]) == 0  # fmt: skip
    assert '"n": 3' in capsys.readouterr().out  # shard 1's rows no longer count
    assert main(["rerun", str(campaign), "--shard", "0", "--quiet"]) == 0  # same weights now
    assert main(["rerun", str(campaign), "--quiet"]) == 0
    shards = json.loads((campaign / "state.json").read_text())["shards"]
    assert [s["status"] for s in shards] == ["done", "done"]
    assert [s["weights_fingerprint"] for s in shards] == [
        s["weights_fingerprint"] for s in reference
    ]
    capsys.readouterr()
    assert main(["query", str(campaign), "SELECT count(*) AS n, count(DISTINCT step) AS d "
                 "FROM edits", "--format", "json"]) == 0  # fmt: skip
    assert '"n": 6' in capsys.readouterr().out


@pytest.mark.slow
def test_rebuild_writes_the_model_at_any_step(
    tiny_testbed: Path, tiny_stats: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    campaign = _ran(tmp_path, tiny_testbed, tiny_stats)
    spec = frozen_spec(campaign)
    threads = torch.get_num_threads()
    try:  # the live run, in this process, with the campaign's one thread
        live = SequentialEditor(spec.model, spec.method, spec.hparams, stats_dir=spec.stats,
                                campaign="live", torch_threads=1)  # fmt: skip
        _, requests = load_testbed(tiny_testbed)
        for step in range(5):
            live.edit(requests[step], step)
        fingerprint = rebuild_model(campaign, 4, tmp_path / "m4")  # mid-shard 1
    finally:
        torch.set_num_threads(threads)
    assert fingerprint == live.weights_fingerprint()
    rebuilt = AutoModelForCausalLM.from_pretrained(tmp_path / "m4")
    name = live.modules[0] + ".weight"
    assert torch.equal(rebuilt.state_dict()[name], live.model.state_dict()[name])

    assert main(["rebuild", str(campaign), "--step", "5", "--out", str(tmp_path / "m5")]) == 0
    assert "model after step 5" in capsys.readouterr().out  # checked against state.json
    assert main(["rebuild", str(campaign), "--step", "6", "--out", str(tmp_path / "m6")]) == 2
    assert "steps 0..5" in capsys.readouterr().err


@pytest.mark.slow
def test_rerun_of_shards_apart_starts_each_from_its_own_checkpoint(
    tiny_testbed: Path, tiny_stats: Path, tmp_path: Path
) -> None:
    spec = load_spec(_spec(tmp_path, tiny_testbed, tiny_stats, shard_size=2))
    reference = run_campaign(spec, tmp_path / "c")
    state = rerun_campaign(tmp_path / "c", shards=[0, 2])
    assert [s.attempt for s in state.shards] == [1, 0, 1]
    assert [s.weights_fingerprint for s in state.shards] == [
        s.weights_fingerprint for s in reference.shards
    ]
