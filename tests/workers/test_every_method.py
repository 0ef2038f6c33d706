"""Every registered method edits the tiny testbed through the SequentialEditor.

Adding a method to the registry adds it here: the test reads the registry, not a list.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from seqedit.methods.registry import METHODS
from seqedit.pipeline.run.train_job import StopState, TrainJob, make_trainer, write_best
from seqedit.testbed.build import load_testbed
from seqedit.workers.edit_log import encode_edit_log
from seqedit.workers.editor import SequentialEditor
from seqedit.workers.model_io import load_model
from seqedit.workers.trainer_common import LocalCollectives
from tests.conftest import TINY_LAYER

# Each method's fast config on the tiny testbed (`EditMethod.quick_hparams`, written for its
# layer 0: the layer the session's stats cover).
assert TINY_LAYER == 0, "the methods' quick_hparams edit layer 0 of the tiny testbed"
QUICK_HPARAMS: dict[str, dict[str, object]] = {
    name: copy.deepcopy(dict(method.quick_hparams)) for name, method in METHODS.items()
}


def quickly_trained(name: str, tiny_testbed: Path, out: Path) -> str:
    """A checkpoint of `name`'s `TrainedParts.quick_training` on the tiny testbed's requests
    (the trainer run in-process, as one Ray Train worker runs it)."""
    trained = METHODS[name].trained
    assert trained is not None and trained.quick_training is not None
    requests = tiny_testbed / "requests.jsonl"
    job = TrainJob(method=name, model=str(tiny_testbed), train=str(requests), val=str(requests),
                   out=str(out), config=dict(trained.quick_training))  # fmt: skip
    model, tokenizer = load_model(str(tiny_testbed))
    _, train = load_testbed(tiny_testbed)
    trainer = make_trainer(job, model, tokenizer, train, LocalCollectives())
    while trainer.step < job.config.max_steps:
        trainer.train_step()
    write_best(out, job, trainer, StopState())
    return str(out)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_method_raises_the_new_target(
    name: str, tiny_testbed: Path, tiny_stats: Path, tmp_path: Path
) -> None:
    assert QUICK_HPARAMS[name], f"give the new method {name!r} its quick_hparams"
    hparams = QUICK_HPARAMS[name]
    trained = METHODS[name].trained
    if trained is not None and trained.quick_training is not None:
        hparams = {**hparams, "checkpoint": quickly_trained(name, tiny_testbed, tmp_path)}
    editor = SequentialEditor(
        str(tiny_testbed), name, hparams, stats_dir=str(tiny_stats), campaign="t"
    )
    _, requests = load_testbed(tiny_testbed)
    before = editor.weights_fingerprint()
    row = editor.edit(requests[0], 0)
    assert row.method == name and row.method_version
    assert row.p_new_after > row.p_new_before
    method = METHODS[name]
    if method.memory is None:
        assert row.update_norm > 0
    else:
        assert row.memory_size == 1
    assert editor.weights_fingerprint() != before
    described = json.loads(json.dumps(editor.describe()))  # what method.json records
    assert described["method"] == name and (described["modules"] or described["memory"])
    _matches_footprint(editor, name)


def _described(tensors: dict[str, torch.Tensor], shapes: bool) -> dict[str, object]:
    return {k: (tuple(t.shape) if shapes else None, t.dtype) for k, t in tensors.items()}


def _matches_footprint(editor: SequentialEditor, name: str) -> None:
    """What the method's footprint says one step logs and a checkpoint holds is what the
    edit logged and the checkpoint holds: the same names and dtypes, and shapes unless they
    are typical sizes (a memory's label width depends on the target, MEND's rank on the
    example's tokens)."""
    method = METHODS[name]
    assert method.footprint is not None, f"give the new method {name!r} its footprint"
    shapes = method.memory is None and not method.footprint.typical
    logged = editor.edit_log_since(0)
    said = encode_edit_log([(0, method.footprint.step(editor.model, editor.config, 1))])
    assert _described(said, shapes) == _described(logged, shapes)
    state = {k: v for k, v in editor.checkpoint().items() if k.startswith("state.")}
    said_state = method.footprint.state(editor.model, editor.config, 1)
    assert _described({f"state.{k}": v for k, v in said_state.items()}, shapes) == _described(
        state, shapes
    )
