"""`seqedit hparams import`: EasyEdit YAML and reference JSON files become our hparams."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from seqedit.methods.config import HparamsError
from seqedit.methods.registry import get_method
from seqedit.pipeline.cli.hparams_import import (
    TEMPLATE_FIELDS,
    ImportedHparams,
    import_hparams,
    read_hparams_file,
    render_yaml,
)
from seqedit.pipeline.cli.main import main
from tests.golden import golden_dir, reference_config
from tests.shared_files import require_shared

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "hparams"
EASY_ROME = FIXTURES / "easyedit" / "ROME" / "gpt2-medium.yaml"
EASY_FT_M = FIXTURES / "easyedit" / "FT" / "mistral-7b.yaml"
EASY_ALPHA = FIXTURES / "easyedit" / "AlphaEdit" / "llama3-8b.yaml"
REF_MEMIT = FIXTURES / "reference" / "MEMIT" / "EleutherAI_gpt-j-6B.json"
REF_ROME = FIXTURES / "reference" / "ROME" / "gpt2-xl.json"
MODULE_FIELDS = list(TEMPLATE_FIELDS)


def _validates(imported: ImportedHparams) -> None:
    get_method(imported.method).config_cls.model_validate(imported.hparams)


def _write(path: Path, data: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _easyedit_rome(**changes: Any) -> dict[str, Any]:
    return yaml.safe_load(EASY_ROME.read_text()) | changes


@pytest.mark.parametrize(
    ("path", "method", "fmt", "family"),
    [
        (EASY_ROME, "rome", "easyedit", "gpt2"),
        (EASY_FT_M, "ft-m", "easyedit", "mistral"),
        (EASY_ALPHA, "alphaedit", "easyedit", "llama"),
        (REF_MEMIT, "memit", "reference", "gptj"),
        (REF_ROME, "rome", "reference", "gpt2"),
    ],
)
def test_fixture_imports_and_validates(path: Path, method: str, fmt: str, family: str) -> None:
    imported = import_hparams(path)
    assert (imported.method, imported.source_format) == (method, fmt)
    _validates(imported)
    assert "module_names" not in imported.hparams
    for field in MODULE_FIELDS:
        assert imported.dropped[field].startswith(f"same as the built-in names for {family}")


def test_easyedit_rome_values() -> None:
    imported = import_hparams(EASY_ROME)
    assert imported.hparams["layer"] == 8 and imported.renamed == {"layers": "layer"}
    assert imported.hparams["v_lr"] == 0.5  # '5e-1' is text to YAML; EasyEdit reads a float
    assert imported.hparams["mom2_adjustment"] is False
    assert imported.hparams["context_template_length_params"] == [[5, 10], [10, 10]]
    for field in ("alg_name", "model_name", "device", "stats_dir", "mom2_n_samples", "fp16"):
        assert field in imported.dropped
    assert "seqedit stats build" in imported.dropped["mom2_dataset"]
    assert any("'transformer.wte' read as 'lm_head'" in note for note in imported.notes)


def test_easyedit_ft_m_values() -> None:
    imported = import_hparams(EASY_FT_M)
    assert imported.hparams == {
        "layer": 20,
        "objective": "target_new",
        "num_steps": 30,
        "lr": 1e-4,
        "weight_decay": 0.0,
        "norm_constraint": None,
    }
    assert imported.renamed == {"layers": "layer", "objective_optimization": "objective"}
    assert {"kl_factor", "batch_size", "max_length"} <= set(imported.dropped)


def test_easyedit_alphaedit_drops_what_alphaedit_never_reads() -> None:
    imported = import_hparams(EASY_ALPHA)
    assert imported.hparams["layers"] == [4, 5, 6, 7, 8]
    assert (imported.hparams["nullspace_threshold"], imported.hparams["L2"]) == (0.02, 10.0)
    assert {"mom2_update_weight", "P_loc", "layer_selection"} <= set(imported.dropped)


def test_reference_method_comes_from_the_path() -> None:
    imported = import_hparams(REF_MEMIT)
    assert imported.hparams["mom2_update_weight"] == 15000.0
    assert "from the file name" in imported.dropped["rewrite_module_tmp"]


def test_custom_module_names_are_kept(tmp_path: Path) -> None:
    custom = {
        "model_name": "./hugging_cache/chatglm2-6b",
        "rewrite_module_tmp": "transformer.encoder.layers.{}.mlp.dense_4h_to_h",
        "layer_module_tmp": "transformer.encoder.layers.{}",
        "mlp_module_tmp": "transformer.encoder.layers.{}.mlp",
        "attn_module_tmp": "transformer.encoder.layers.{}.self_attention",
        "ln_f_module": "transformer.encoder.final_layernorm",
        "lm_head_module": "transformer.output_layer",
    }
    imported = import_hparams(_write(tmp_path / "glm.yaml", _easyedit_rome(**custom)))
    names = imported.hparams["module_names"]
    assert names["rewrite_weight_transposed"] is False
    assert names["ln_f_module"] == "transformer.encoder.final_layernorm"
    assert imported.renamed["lm_head_module"] == "module_names.lm_head_module"
    assert not any(field in imported.dropped for field in MODULE_FIELDS)
    _validates(imported)


def test_custom_gpt2_names_are_conv1d(tmp_path: Path) -> None:
    source = _easyedit_rome(rewrite_module_tmp="transformer.h.{}.attn.c_proj")
    imported = import_hparams(_write(tmp_path / "attn.yaml", source))
    names = imported.hparams["module_names"]
    assert names["rewrite_weight_transposed"] is True
    assert names["lm_head_module"] == "lm_head"  # the tied 'transformer.wte' means the head


def test_unknown_field_gets_did_you_mean(tmp_path: Path) -> None:
    source = _easyedit_rome(v_lrr=0.1, colour="blue")
    with pytest.raises(HparamsError) as err:
        import_hparams(_write(tmp_path / "typo.yaml", source))
    text = str(err.value)
    assert "typo.yaml" in text and "field 'v_lrr'" in text and "did you mean 'v_lr'" in text
    assert "field 'colour'" in text


def test_rome_with_two_layers_is_refused(tmp_path: Path) -> None:
    path = _write(tmp_path / "two.yaml", _easyedit_rome(layers=[4, 5]))
    with pytest.raises(HparamsError, match=r"two\.yaml: field 'layers': rome edits one layer"):
        import_hparams(path)


def test_contradicting_method_is_refused() -> None:
    with pytest.raises(HparamsError, match=r"field 'alg_name'.*'rome' but --method is 'memit'"):
        import_hparams(EASY_ROME, method="memit")
    with pytest.raises(HparamsError, match=r"field 'objective_optimization'.*'ft-m'"):
        import_hparams(EASY_FT_M, method="ft-l")
    with pytest.raises(HparamsError, match="its path: the file is 'memit'"):
        import_hparams(REF_MEMIT, method="alphaedit")


def test_explicit_method_agrees() -> None:
    assert import_hparams(EASY_FT_M, method="FT-M").method == "ft-m"


def test_undetectable_method_asks_for_it(tmp_path: Path) -> None:
    path = tmp_path / "models" / "gpt2-xl.json"
    path.parent.mkdir()
    path.write_text(REF_ROME.read_text())
    with pytest.raises(HparamsError, match=r"gpt2-xl\.json: cannot tell the method.*--method"):
        import_hparams(path)
    assert import_hparams(path, method="rome").hparams["layer"] == 17


@pytest.mark.parametrize("method", ["rome", "memit", "alphaedit"])
def test_golden_hparams_import(method: str) -> None:
    path = require_shared(golden_dir() / f"hparams_{method}.json", "golden hparams",
                          "set SEQEDIT_GOLDEN_DIR")  # fmt: skip
    imported = import_hparams(path)
    assert imported.method == method and "module_names" not in imported.hparams
    config_cls = get_method(method).config_cls
    raw = yaml.safe_load(path.read_text())
    overrides = {"layer": raw["layers"][0]} if method == "rome" else {}
    expected = reference_config(config_cls, raw, **overrides)
    assert config_cls.model_validate(imported.hparams) == expected


def test_cli_prints_our_yaml(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["hparams", "import", str(EASY_ALPHA)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("# Imported by `seqedit hparams import`")
    assert "#   P_loc: " in out and "# Dropped:" in out
    parsed = yaml.safe_load(out)
    assert parsed["method"] == "alphaedit" and parsed["hparams"]["L2"] == 10.0


def test_cli_writes_a_file_edit_reads(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "ours" / "rome.yaml"
    assert main(["hparams", "import", str(REF_ROME), "--out", str(out)]) == 0
    assert "rome" in capsys.readouterr().out
    hparams = import_hparams(REF_ROME).hparams
    assert read_hparams_file(out, "rome") == ("rome", hparams)
    assert read_hparams_file(out, None) == ("rome", hparams)  # the file names its method
    with pytest.raises(HparamsError, match="field 'method'"):
        read_hparams_file(out, "memit")
    flat = _write(tmp_path / "flat.yaml", {"layer": 3})
    assert read_hparams_file(flat, "ROME") == ("rome", {"layer": 3})
    with pytest.raises(HparamsError, match="pass --method"):
        read_hparams_file(flat, None)


def test_cli_error_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _write(tmp_path / "bad.yaml", _easyedit_rome(v_lrr=0.1))
    assert main(["hparams", "import", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("seqedit: error:") and "did you mean 'v_lr'" in err


def test_render_yaml_round_trips() -> None:
    imported = import_hparams(EASY_FT_M)
    parsed = yaml.safe_load(render_yaml(imported, EASY_FT_M))
    assert parsed == {"method": "ft-m", "hparams": imported.hparams}


EASY_GRACE = FIXTURES / "easyedit" / "GRACE" / "gpt2-xl.yaml"


def test_easyedit_grace_values(tmp_path: Path) -> None:
    imported = import_hparams(EASY_GRACE)
    assert imported.method == "grace"
    assert imported.hparams == {
        "layer": 35, "role": "mlp_in", "eps_init": 1.0, "n_iter": 200, "edit_lr": 1.0,
        "replacement": "replace_last", "dist_fn": "euc", "val_init": "cold", "val_train": "sgd",
        "eps_expand": "coverage",
    }  # fmt: skip
    assert imported.renamed == {"inner_params": "layer, role", "eps": "eps_init"}
    assert {"val_reg", "reg", "dropout", "num_pert", "model_name"} <= set(imported.dropped)
    source = yaml.safe_load(EASY_GRACE.read_text())
    llama = source | {"inner_params": ["model.layers[27].mlp.down_proj.weight"]}
    assert import_hparams(_write(tmp_path / "llama.yaml", llama)).hparams["role"] == "mlp_out"
    with pytest.raises(HparamsError, match=r"field 'inner_params': 'foo\.bar' is no block"):
        import_hparams(_write(tmp_path / "bad.yaml", source | {"inner_params": ["foo.bar"]}))


EASY_LORA = FIXTURES / "easyedit" / "LoRA" / "gpt2-xl.yaml"
EASY_DPO = FIXTURES / "easyedit" / "DPO" / "llama-7b.yaml"


def test_easyedit_lora_and_dpo_values(tmp_path: Path) -> None:
    lora = import_hparams(EASY_LORA)
    assert lora.method == "lora"
    assert lora.hparams == {
        "roles": ["attn_qkv"], "layers": [], "num_steps": 30, "lr": 5e-3, "weight_decay": 0,
        "rank": 8, "lora_alpha": 32, "lora_dropout": 0.1,
    }  # fmt: skip
    assert any("adalora -> a plain LoRA" in note for note in lora.notes)
    assert {"kl_factor", "norm_constraint", "batch_size", "max_length"} <= set(lora.dropped)
    _validates(lora)
    dpo = import_hparams(EASY_DPO)
    assert dpo.method == "dpo"
    assert dpo.hparams["roles"] == ["attn_q", "attn_v"]
    assert (dpo.hparams["alpha"], dpo.hparams["beta"], dpo.hparams["num_steps"]) == (0.99, 0.1, 7)
    _validates(dpo)
    source = yaml.safe_load(EASY_LORA.read_text())
    with pytest.raises(HparamsError, match=r"field 'target_modules': 'c_proj' is ambiguous"):
        import_hparams(_write(tmp_path / "bad.yaml", source | {"target_modules": ["c_proj"]}))
    with pytest.raises(HparamsError, match=r"field 'lora_type'.*'lora' or 'adalora'"):
        import_hparams(_write(tmp_path / "bad2.yaml", source | {"lora_type": "ia3"}))
