"""Reading a method's trained parts (`EditMethod.trained`): the checkpoint `seqedit train`
wrote, checked before a campaign edits with it.

A checkpoint is `<out>/best/editor.pt` (a config may name `<out>` or the file itself):
tensors and plain values only (read with `weights_only`, never arbitrary pickled objects),
holding the fields the method's `TrainedParts.fields` names (MEND: `editor`, the network's
state dict, `modules`, `shapes` and `network`, its shape; SERAC: `classifier`,
`counterfactual`, `counterfactual_config` and `network`). The `provenance.json` beside it
names the model it was trained on; a checkpoint of another model is refused by its
fingerprint.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from seqedit.errors import SeqeditError
from seqedit.methods.method import EditMethod
from seqedit.workers.model_io import model_fingerprint

CHECKPOINT_FILE = "editor.pt"


class TrainedPartsError(SeqeditError, ValueError):
    """A trained checkpoint that cannot be used; names the file and the field."""


def checkpoint_file(named: Path) -> Path:
    """The checkpoint file a config names: the file, or a training directory's best."""
    if named.is_dir():
        best = named / "best" / CHECKPOINT_FILE
        return best if best.is_file() else named / CHECKPOINT_FILE
    return named


def load_trained_parts(
    method: EditMethod, config: Any, model_dir: str | Path | None
) -> dict[str, Any] | None:
    """The contents of the checkpoint `config` names for `method` (with "source": its
    path), or None when the method has no trained parts or the config names none. Checked:
    readable, the fields above, and (when `model_dir` is known) trained on that model."""
    if method.trained is None:
        return None
    named = method.trained.checkpoint(config)
    if named is None:
        return None
    path = checkpoint_file(Path(named))
    if not path.is_file():
        raise TrainedPartsError(
            f"{named}: no trained {method.name} checkpoint there (looked for {path}); "
            f"make one with `{method.trained.command}`"
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # unpickling, zip and I/O errors all mean the same here
        raise TrainedPartsError(
            f"{path}: not a checkpoint torch.load can read safely ({type(exc).__name__})"
        ) from exc
    if not isinstance(state, dict):
        raise TrainedPartsError(f"{path}: holds a {type(state).__name__}, expected a dict")
    missing = [key for key in method.trained.fields if key not in state]
    if missing:
        raise TrainedPartsError(f"{path}: missing field(s) {', '.join(missing)}")
    provenance = path.parent / "provenance.json"
    if model_dir is not None and provenance.is_file():
        trained_on = json.loads(provenance.read_text(encoding="utf-8")).get("model_fingerprint")
        here = model_fingerprint(model_dir)
        if trained_on != here:
            raise TrainedPartsError(
                f"{provenance}: field model_fingerprint is {str(trained_on)[:12]}, but "
                f"{model_dir} is {here[:12]}: a {method.name} network trained on another model"
            )
    return {**state, "source": str(path)}


def prepare_context(
    method: EditMethod,
    model: Any,
    tokenizer: Any,
    config: Any,
    model_dir: str | Path | None,
    second_moments: dict[int, Any] | None = None,
    derived: Any = None,
) -> Any:
    """`method.prepare` with its trained parts read (when it has any): what the editor, every
    evaluator and a saved memory's loader build alike, so all of them answer the same.
    `model_dir`: the model the parts must have been trained on (None: not checked)."""
    trained = load_trained_parts(method, config, model_dir)
    extra = () if method.trained is None else (trained,)
    return method.prepare(model, tokenizer, config, second_moments, derived, *extra)
