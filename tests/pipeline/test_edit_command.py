"""`seqedit edit`: one-off sequential edits, deltas to safetensors, the edited model saved."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from seqedit.pipeline.cli.main import main
from tests.conftest import TINY_LAYER


def test_edit_saves_deltas_and_model(
    tiny_testbed: Path, tiny_stats: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    requests = tmp_path / "two.jsonl"
    lines = (tiny_testbed / "requests.jsonl").read_text().splitlines()[:2]
    requests.write_text("\n".join(lines) + "\n")
    hparams = tmp_path / "rome.yaml"
    hparams.write_text(yaml.safe_dump({"layer": TINY_LAYER, "context_templates": ["{}"]}))
    code = main(
        [
            "edit", "--model", str(tiny_testbed), "--method", "rome", "--hparams", str(hparams),
            "--requests", str(requests), "--stats", str(tiny_stats),
            "--save-deltas", str(tmp_path / "d.safetensors"), "--save-model", str(tmp_path / "m"),
        ]
    )  # fmt: skip
    assert code == 0
    out = capsys.readouterr().out
    assert out.count("step ") == 2 and "edits succeeded" in out
    with safe_open(str(tmp_path / "d.safetensors"), framework="pt") as handle:
        keys = sorted(handle.keys())
        assert handle.metadata()["n_edits"] == "2"
    assert len(keys) == 4 and keys[0].startswith("step0.") and keys[-1].endswith(".right")
    edited = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    base = AutoModelForCausalLM.from_pretrained(tiny_testbed)
    name = f"transformer.h.{TINY_LAYER}.mlp.c_proj.weight"
    assert not edited.state_dict()[name].equal(base.state_dict()[name])


def test_unknown_hparam_is_named(tiny_testbed: Path, tmp_path: Path, capsys) -> None:
    hparams = tmp_path / "rome.yaml"
    hparams.write_text("layer: 0\nv_lrr: 0.1\n")
    code = main(
        [
            "edit", "--model", str(tiny_testbed), "--method", "rome", "--hparams", str(hparams),
            "--requests", str(tiny_testbed / "requests.jsonl"),
            "--save-deltas", str(tmp_path / "d.safetensors"),
        ]
    )  # fmt: skip
    assert code == 2
    assert "v_lrr" in capsys.readouterr().err


def _memit_files(tiny_testbed: Path, tmp_path: Path, n: int) -> tuple[Path, Path]:
    requests = tmp_path / "some.jsonl"
    lines = (tiny_testbed / "requests.jsonl").read_text().splitlines()[:n]
    requests.write_text("\n".join(lines) + "\n")
    hparams = tmp_path / "memit.yaml"
    memit = {"layers": [TINY_LAYER], "v_loss_layer": 3, "context_templates": [["{}"]],
             "mom2_update_weight": 100.0}  # fmt: skip
    hparams.write_text(yaml.safe_dump({"method": "memit", "hparams": memit}))
    return requests, hparams


def test_batch_applies_all_requests_as_one_step(
    tiny_testbed: Path, tiny_stats: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    requests, hparams = _memit_files(tiny_testbed, tmp_path, 3)
    code = main(
        [
            "edit", "--model", str(tiny_testbed), "--hparams", str(hparams),
            "--requests", str(requests), "--stats", str(tiny_stats), "--batch",
            "--save-deltas", str(tmp_path / "d.safetensors"),
        ]
    )  # fmt: skip
    assert code == 0
    out = capsys.readouterr().out
    assert out.count("step 0 case") == 3
    with safe_open(str(tmp_path / "d.safetensors"), framework="pt") as handle:
        assert handle.metadata()["n_steps"] == "1" and handle.metadata()["n_edits"] == "3"
        right = handle.get_tensor(f"step0.transformer.h.{TINY_LAYER}.mlp.c_proj.right")
    assert right.shape[1] == 3  # one rank per request in the batch


def test_batch_with_a_one_at_a_time_method_is_refused(
    tiny_testbed: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    hparams = tmp_path / "ft.yaml"
    hparams.write_text(f"layer: {TINY_LAYER}\n")
    code = main(
        [
            "edit", "--model", str(tiny_testbed), "--method", "ft-m", "--hparams", str(hparams),
            "--requests", str(tiny_testbed / "requests.jsonl"), "--batch",
            "--save-deltas", str(tmp_path / "d.safetensors"),
        ]
    )  # fmt: skip
    assert code == 2
    assert "edits one request at a time" in capsys.readouterr().err
    assert not (tmp_path / "d.safetensors").exists()
