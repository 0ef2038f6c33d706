"""Campaign spec: validation errors name the file and field; paths resolve against the spec."""

from __future__ import annotations

from pathlib import Path

import pytest

from seqedit.schemas.campaign import SpecError, load_spec

GOOD = """
name: t
model: model
dataset: {path: data/requests.jsonl}
hparams: {layer: 1}
stats: stats
n_edits: 10
"""


def test_relative_paths_resolve_against_the_spec_folder(tmp_path: Path) -> None:
    (tmp_path / "spec.yaml").write_text(GOOD)
    spec = load_spec(tmp_path / "spec.yaml")
    assert spec.model == str(tmp_path / "model")
    assert spec.dataset.path == str(tmp_path / "data/requests.jsonl")
    assert spec.stats == str(tmp_path / "stats")
    assert spec.hparams == {"layer": 1}
    trained = GOOD.replace("hparams: {layer: 1}", "method: mend\nhparams: {checkpoint: ../mend}")
    (tmp_path / "mend.yaml").write_text(trained)
    mend = load_spec(tmp_path / "mend.yaml")
    assert mend.hparams == {"checkpoint": str(tmp_path.parent / "mend")}


def test_spec_hash_changes_with_content(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text(GOOD)
    (tmp_path / "b.yaml").write_text(GOOD.replace("n_edits: 10", "n_edits: 11"))
    assert load_spec(tmp_path / "a.yaml").spec_hash() != load_spec(tmp_path / "b.yaml").spec_hash()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (GOOD.replace("n_edits: 10", "n_edits: -1"), "field 'n_edits'"),
        (GOOD.replace("name: t", "name: t\nbogus: 1"), "field 'bogus'"),
        (
            GOOD.replace("dataset: {path: data/requests.jsonl}", "dataset: {}"),
            "field 'dataset.path'",
        ),
        ("name: [unclosed", "not valid YAML"),
        ("- a list", "is a mapping"),
    ],
)
def test_bad_specs_name_file_and_field(tmp_path: Path, text: str, message: str) -> None:
    file = tmp_path / "spec.yaml"
    file.write_text(text)
    with pytest.raises(SpecError, match=message) as info:
        load_spec(file)
    assert str(file) in str(info.value)
