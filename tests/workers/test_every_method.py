"""Every registered method edits the tiny testbed through the SequentialEditor.

Adding a method to the registry adds it here: the test reads the registry, not a list.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from seqedit.methods.registry import METHODS
from seqedit.testbed.build import load_testbed
from seqedit.workers.editor import SequentialEditor
from tests.conftest import TINY_LAYER

# The fewest fields that make each method fast on the tiny testbed; anything else is default.
LAYERED = {"layers": [TINY_LAYER], "v_loss_layer": 3, "context_templates": [["{}"]]}
QUICK_HPARAMS: dict[str, dict[str, object]] = {
    "rome": {"layer": TINY_LAYER, "context_templates": ["{}"]},
    "memit": LAYERED,
    "alphaedit": LAYERED,
    "ft-l": {"layer": TINY_LAYER, "lr": 1e-2, "num_steps": 10},
    "ft-m": {"layer": TINY_LAYER, "lr": 1e-2, "num_steps": 10},
}


@pytest.mark.parametrize("name", sorted(METHODS))
def test_method_raises_the_new_target(name: str, tiny_testbed: Path, tiny_stats: Path) -> None:
    assert name in QUICK_HPARAMS, f"add quick hparams for the new method {name!r}"
    hparams = QUICK_HPARAMS[name]
    editor = SequentialEditor(
        str(tiny_testbed), name, hparams, stats_dir=str(tiny_stats), campaign="t"
    )
    _, requests = load_testbed(tiny_testbed)
    before = editor.weights_fingerprint()
    row = editor.edit(requests[0], 0)
    assert row.method == name and row.method_version
    assert row.p_new_after > row.p_new_before
    assert row.update_norm > 0 and editor.weights_fingerprint() != before
    described = json.loads(json.dumps(editor.describe()))  # what method.json records
    assert described["method"] == name and described["modules"]
