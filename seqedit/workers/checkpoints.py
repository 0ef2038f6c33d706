"""Editor checkpoints on disk: everything the next edit depends on, in one safetensors file.

A checkpoint holds `SequentialEditor.checkpoint()` (fp32 masters of the edited modules, the
method's sequential state, the edit and step counts); its metadata names the method and
the sha256 fingerprint of the masters. Loading restores the editor and then checks that
its weights hash to that fingerprint, so a damaged or foreign file cannot pass silently.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from safetensors import SafetensorError

from seqedit.errors import SeqeditError
from seqedit.storage import Where
from seqedit.workers.tensor_files import read_safetensors, write_safetensors

if TYPE_CHECKING:  # the editor imports this module
    from seqedit.workers.editor import SequentialEditor


class CheckpointError(SeqeditError, ValueError):
    """A checkpoint that cannot be used, naming the file and the field."""


def save_checkpoint(editor: SequentialEditor, path: Where) -> str:
    """Write the editor's checkpoint to `path` (a local path or storage URI) atomically;
    returns its weights fingerprint."""
    fingerprint = editor.weights_fingerprint()
    metadata = {
        "method": editor.method.name,
        "method_version": editor.method.version,
        "weights_fingerprint": fingerprint,
        "n_applied": str(editor.n_applied),
    }
    write_safetensors(path, editor.checkpoint(), metadata)
    return fingerprint


def load_checkpoint(
    editor: SequentialEditor, path: Where, *, expected_fingerprint: str | None = None
) -> None:
    """Restore `editor` from `path`, refusing another method or weights that do not hash to
    the recorded (and, if given, the expected) fingerprint."""
    try:
        tensors, metadata = read_safetensors(path)
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{path}: unreadable checkpoint ({exc})") from exc
    method = (metadata.get("method"), metadata.get("method_version"))
    if method != (editor.method.name, editor.method.version):
        raise CheckpointError(
            f"{path}: field method is {method}, this editor runs "
            f"{(editor.method.name, editor.method.version)}"
        )
    recorded = metadata.get("weights_fingerprint")
    if expected_fingerprint is not None and recorded != expected_fingerprint:
        raise CheckpointError(
            f"{path}: field weights_fingerprint is {recorded}, the campaign state expects "
            f"{expected_fingerprint}"
        )
    try:
        editor.restore(tensors)
    except (KeyError, ValueError) as exc:
        raise CheckpointError(f"{path}: does not fit this editor: {exc}") from exc
    if editor.weights_fingerprint() != recorded:
        raise CheckpointError(f"{path}: field weights_fingerprint does not match its tensors")
