"""`method: mend` in the editor: the trained network a checkpoint holds edits exactly as it
did in training, the untrained one is a gradient step, and a checkpoint that is missing,
unreadable, of other maps or of another model is refused by name."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch

from seqedit.methods.arch import module_names_for
from seqedit.methods.mend import (
    MendEditor,
    MendNetworkConfig,
    default_mend_modules,
    mend_updates,
    weight_shapes,
)
from seqedit.schemas.loaders import load_requests
from seqedit.workers.editor import SequentialEditor
from seqedit.workers.model_io import load_model, model_fingerprint
from seqedit.workers.trained_parts import TrainedPartsError

NETWORK = MendNetworkConfig(rank=4, edit_lr=0.05)


def _trained(testbed: Path, out: Path, *, last: int = 1, seed: int = 0) -> MendEditor:
    """A MEND network for `testbed` whose parameters are not the initial ones (as after
    training), saved as `seqedit train mend` saves its best: out/best/editor.pt and
    provenance.json."""
    model, _ = load_model(testbed)
    names = module_names_for(model)
    modules = default_mend_modules(names, model.config.n_layer, last=last)
    shapes = weight_shapes(model, modules, names.rewrite_weight_transposed)
    editor = MendEditor(modules, shapes, NETWORK)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in editor.parameters():
            param.add_(0.01 * torch.randn(param.shape, generator=generator))
    (out / "best").mkdir(parents=True)
    torch.save({"editor": editor.state_dict(), "modules": modules, "shapes": shapes,
                "network": NETWORK.model_dump()}, out / "best" / "editor.pt")  # fmt: skip
    provenance = {"model_fingerprint": model_fingerprint(testbed), "step": 6}
    (out / "best" / "provenance.json").write_text(json.dumps(provenance))
    return editor.eval()


def test_a_trained_checkpoint_edits_as_its_network(tiny_testbed: Path, tmp_path: Path) -> None:
    network = _trained(tiny_testbed, tmp_path / "train")
    request = load_requests(tiny_testbed / "requests.jsonl").requests[0]
    editor = SequentialEditor(str(tiny_testbed), "mend",
                              {"checkpoint": str(tmp_path / "train"), "last_blocks": 1},
                              stats_dir=None, campaign="t")  # fmt: skip
    expected = mend_updates(editor.model, editor.tokenizer, request, network)  # before the edit
    before = {n: p.detach().clone() for n, p in editor.model.named_parameters()}
    row = editor.edit(request, 0)
    ((_, logged),) = editor.edit_log
    assert [u.module for u in logged] == [u.module for u in expected]
    for ours, theirs in zip(logged, expected, strict=True):
        torch.testing.assert_close(ours.dense(), theirs.dense())
        assert ours.rank == theirs.rank > 1  # one rank-one term per token of the example
    changed = {n for n, p in editor.model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == {f"{m}.weight" for m in network.modules_edited}
    assert row.opt_steps == 0 and row.update_norm > 0


def test_the_untrained_network_is_a_gradient_step(tiny_testbed: Path) -> None:
    request = load_requests(tiny_testbed / "requests.jsonl").requests[0]
    hparams = {"last_blocks": 1, "network": {"rank": 4, "edit_lr": 0.05}}
    editor = SequentialEditor(str(tiny_testbed), "mend", hparams, stats_dir=None, campaign="t")
    model = editor.model
    names = module_names_for(model)
    modules = default_mend_modules(names, model.config.n_layer, last=1)
    shapes = weight_shapes(model, modules, names.rewrite_weight_transposed)
    untrained = MendEditor(modules, shapes, NETWORK).eval()
    expected = mend_updates(model, editor.tokenizer, request, untrained)
    editor.edit(request, 0)
    for ours, theirs in zip(editor.edit_log[0][1], expected, strict=True):
        torch.testing.assert_close(ours.dense(), theirs.dense())


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize(
    "case, message",
    [
        ("missing", "no trained mend checkpoint there"),
        ("other maps", "field modules: trained for"),
        ("other model", "field model_fingerprint is"),
        ("a pickled object", "not a checkpoint torch.load can read safely"),
        ("no network", "missing field(s) network"),
    ],
)
def test_a_bad_checkpoint_is_refused_by_name(
    tiny_testbed: Path, tmp_path: Path, case: str, message: str
) -> None:
    out = tmp_path / "train"
    hparams: dict[str, object] = {"checkpoint": str(out), "last_blocks": 1}
    if case == "missing":
        out.mkdir()
    elif case == "other maps":
        _trained(tiny_testbed, out, last=2)
    else:
        _trained(tiny_testbed, out)
    checkpoint = out / "best" / "editor.pt"
    if case == "other model":
        (out / "best" / "provenance.json").write_text(json.dumps({"model_fingerprint": "0" * 64}))
    elif case == "a pickled object":
        checkpoint.write_bytes(pickle.dumps(Path("x")))
    elif case == "no network":
        state = torch.load(checkpoint, weights_only=True)
        del state["network"]
        torch.save(state, checkpoint)
    with pytest.raises((TrainedPartsError, ValueError)) as caught:
        SequentialEditor(str(tiny_testbed), "mend", hparams, stats_dir=None, campaign="t")
    assert message in str(caught.value)
    assert str(out) in str(caught.value)
