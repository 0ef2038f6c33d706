"""`seqedit hparams import` of EasyEdit's MEND and SERAC files: the edit hparams, and with
`--training` the `seqedit train` config (EasyEdit's iteration counts rescaled to steps)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from seqedit.methods.config import HparamsError
from seqedit.pipeline.cli.hparams_import import import_hparams
from seqedit.pipeline.cli.main import main
from seqedit.pipeline.cli.training_import import import_training
from seqedit.pipeline.run.train_job import TrainJob

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "hparams" / "easyedit"
EASY_MEND = FIXTURES / "MEND" / "gpt2-xl.yaml"
EASY_SERAC = FIXTURES / "SERAC" / "gpt2-xl.yaml"
GPT2_XL_MLPS = [f"transformer.h.{b}.mlp.{m}" for b in (45, 46, 47) for m in ("c_proj", "c_fc")]


def _write(path: Path, data: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


def test_easyedit_mend_edit_hparams() -> None:
    imported = import_hparams(EASY_MEND)
    assert imported.method == "mend"
    assert imported.hparams == {
        "modules": GPT2_XL_MLPS,
        "network": {"rank": 1920, "n_hidden": 1, "edit_lr": 1e-4, "standardise": True},
    }
    assert "archive" in imported.dropped and "checkpoint" in imported.dropped["archive"]
    assert "seqedit train mend" in imported.dropped["cedit"]
    assert imported.dropped["act"] == "what seqedit's mend does (act: 'relu')"


def test_mend_values_seqedit_does_not_implement_are_refused(tmp_path: Path) -> None:
    source = yaml.safe_load(EASY_MEND.read_text())
    for field, value in (("act", "gelu"), ("one_sided", True), ("hidden_dim", 64)):
        bad = _write(tmp_path / f"{field}.yaml", source | {field: value})
        with pytest.raises(HparamsError, match=rf"field '{field}': .* implements {field}: "):
            import_hparams(bad)


def test_easyedit_mend_training_config_is_rescaled_to_steps() -> None:
    imported = import_training(EASY_MEND)
    config = imported.config
    # batch_size 1 x accumulate_bs 10; iterations / 10; patience in validations
    assert config["batch_size"] == 10 and config["max_steps"] == 10_000
    assert config["val_every"] == 100 and config["val_size"] == 2500
    assert config["early_stopping"] == {"patience": 20, "metric": "loss/total"}
    assert config["loss"] == {"c_edit": 0.1, "c_loc": 1.0}
    assert config["lr"] == 1e-6 and config["lr_lr"] == 1e-4 and config["modules"] == GPT2_XL_MLPS
    stopping = config.pop("early_stopping")
    job = TrainJob(method="mend", model="m", train="t", val="v", out="o", config=config,
                   early_stopping=stopping)  # fmt: skip
    assert job.config.network.rank == 1920


def test_easyedit_serac_edit_and_training() -> None:
    imported = import_hparams(EASY_SERAC)
    assert imported.method == "serac" and imported.hparams == {}
    assert "embedding-similarity" in imported.dropped["cls_name"]
    training = import_training(EASY_SERAC)
    assert training.config["counterfactual"] == "./hugging_cache/gpt2"
    assert training.config["lr"] == training.config["cf_lr"] == 1e-5
    assert training.config["batch_size"] == 10 and training.config["max_steps"] == 1000
    assert training.config["loss"] == {"c_edit": 0.1, "c_scope": 1.0}
    assert "cls_name" in training.dropped


def test_training_import_of_a_method_that_trains_nothing_is_refused() -> None:
    rome = FIXTURES / "ROME" / "gpt2-medium.yaml"
    with pytest.raises(HparamsError, match="rome has no training to import"):
        import_training(rome)


def test_cli_writes_a_training_config_train_reads(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "train.yaml"
    assert main(["hparams", "import", str(EASY_SERAC), "--training", "--out", str(out)]) == 0
    assert "training config: serac" in capsys.readouterr().out
    text = out.read_text()
    assert text.startswith("# Imported by `seqedit hparams import --training`")
    fields = yaml.safe_load(text)
    stopping = fields.pop("early_stopping")
    job = TrainJob(method="serac", model="m", train="t", val="v", out="o", config=fields,
                   early_stopping=stopping)  # fmt: skip
    assert job.config.model_dump()["counterfactual"] == "./hugging_cache/gpt2"
