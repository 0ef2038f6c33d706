"""Every registered method edits the tiny testbed through the SequentialEditor.

Adding a method to the registry adds it here: the test reads the registry, not a list.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from seqedit.methods.registry import METHODS
from seqedit.testbed.build import load_testbed
from seqedit.workers.editor import SequentialEditor
from tests.conftest import TINY_LAYER

# The fewest fields that make each method fast on the tiny testbed; anything else is default.
QUICK_HPARAMS: dict[str, dict[str, object]] = {
    "rome": {"context_templates": ["{}"]},
    "ft-l": {"lr": 1e-2, "num_steps": 10},
    "ft-m": {"lr": 1e-2, "num_steps": 10},
}


@pytest.mark.parametrize("name", sorted(METHODS))
def test_method_raises_the_new_target(name: str, tiny_testbed: Path, tiny_stats: Path) -> None:
    hparams = {"layer": TINY_LAYER, **QUICK_HPARAMS.get(name, {})}
    editor = SequentialEditor(
        str(tiny_testbed), name, hparams, stats_dir=str(tiny_stats), campaign="t"
    )
    _, requests = load_testbed(tiny_testbed)
    before = editor.weights_fingerprint()
    row = editor.edit(requests[0], 0)
    assert row.method == name and row.method_version
    assert row.p_new_after > row.p_new_before
    assert row.update_norm > 0 and editor.weights_fingerprint() != before
