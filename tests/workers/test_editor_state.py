"""Sequential state is explicit: checkpoints restore it, the edit log replays the weights.

AlphaEdit is the method with state (its accumulated K K^T), so it is the one that shows
whether a checkpoint is complete: an editor restored from a checkpoint must continue
exactly as the original did.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from seqedit.testbed.build import load_testbed
from seqedit.workers.edit_log import parse_edit_log
from seqedit.workers.editor import SequentialEditor
from tests.conftest import TINY_LAYER
from tests.workers.test_every_method import QUICK_HPARAMS


def _editor(model: Path, stats: Path, method: str) -> SequentialEditor:
    return SequentialEditor(
        str(model), method, QUICK_HPARAMS[method], stats_dir=str(stats), campaign="t"
    )


@pytest.mark.parametrize("method", ["alphaedit", "memit", "ft-m"])
def test_replaying_the_edit_log_rebuilds_the_weights_bit_for_bit(
    method: str, tiny_testbed: Path, tiny_stats: Path, tmp_path: Path
) -> None:
    _, requests = load_testbed(tiny_testbed)
    edited = _editor(tiny_testbed, tiny_stats, method)
    for step, request in enumerate(requests[:4]):
        edited.edit(request, step)
        if step == 1:  # two log files, as two shards write
            save_file(edited.take_edit_log(), str(tmp_path / "shard=0.safetensors"))
    save_file(edited.take_edit_log(), str(tmp_path / "shard=1.safetensors"))
    log = {
        **load_file(tmp_path / "shard=1.safetensors"),
        **load_file(tmp_path / "shard=0.safetensors"),
    }

    fresh = _editor(tiny_testbed, tiny_stats, method)
    assert fresh.replay(log) == 4
    assert fresh.weights_fingerprint() == edited.weights_fingerprint()
    assert fresh.n_applied == 4
    for name, param in fresh.edited.weights.params.items():
        assert torch.equal(param, edited.edited.weights.params[name])


def test_checkpoint_restores_alphaedit_state_and_the_run_continues_identically(
    tiny_testbed: Path, tiny_stats: Path
) -> None:
    _, requests = load_testbed(tiny_testbed)
    original = _editor(tiny_testbed, tiny_stats, "alphaedit")
    for step in range(2):
        original.edit(requests[step], step)
    saved = original.checkpoint()
    assert f"state.cache_c.{TINY_LAYER}" in saved and int(saved["n_applied"][0]) == 2
    assert float(saved[f"state.cache_c.{TINY_LAYER}"].norm()) > 0
    rows = [original.edit(requests[step], step) for step in (2, 3)]

    resumed = _editor(tiny_testbed, tiny_stats, "alphaedit")
    resumed.restore(saved)
    assert resumed.n_applied == 2
    resumed_rows = [resumed.edit(requests[step], step) for step in (2, 3)]
    assert resumed.weights_fingerprint() == original.weights_fingerprint()
    assert [r.p_new_after for r in resumed_rows] == [r.p_new_after for r in rows]
    after = original.checkpoint()
    assert torch.equal(resumed.checkpoint()[f"state.cache_c.{TINY_LAYER}"],
                       after[f"state.cache_c.{TINY_LAYER}"])  # fmt: skip


def test_checkpoint_without_its_state_is_refused(tiny_testbed: Path, tiny_stats: Path) -> None:
    editor = _editor(tiny_testbed, tiny_stats, "alphaedit")
    saved = {k: v for k, v in editor.checkpoint().items() if not k.startswith("state.")}
    with pytest.raises(ValueError, match="AlphaEdit state needs"):
        editor.restore(saved)


def test_stateless_method_refuses_foreign_state(tiny_testbed: Path, tiny_stats: Path) -> None:
    editor = _editor(tiny_testbed, tiny_stats, "rome")
    saved = editor.checkpoint() | {"state.cache_c.0": torch.zeros(2, 2)}
    with pytest.raises(ValueError, match="carries no sequential state"):
        editor.restore(saved)


def test_malformed_edit_log_names_the_key() -> None:
    with pytest.raises(ValueError, match="'bogus'"):
        parse_edit_log({"bogus": torch.zeros(1, 1)})
    with pytest.raises(ValueError, match="a step logs either left and right factors"):
        parse_edit_log({"step0.m.left": torch.zeros(1, 1)})


def test_replay_refuses_a_log_that_does_not_continue(tiny_testbed: Path, tiny_stats: Path) -> None:
    _, requests = load_testbed(tiny_testbed)
    edited = _editor(tiny_testbed, tiny_stats, "rome")
    edited.edit(requests[0], 0)
    edited.take_edit_log()
    edited.edit(requests[1], 1)
    fresh = _editor(tiny_testbed, tiny_stats, "rome")
    with pytest.raises(ValueError, match="replay needs steps 0"):
        fresh.replay(edited.take_edit_log())
