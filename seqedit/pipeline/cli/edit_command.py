"""`seqedit edit`: edit a model once, in order, without the campaign machinery.

For users who just want an edited model: the deltas go to one safetensors file (and,
optionally, the edited model to a new Hugging Face directory); a one-line summary per
edit goes to the terminal.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from seqedit.methods.config import validate_config
from seqedit.methods.registry import get_method, registered_methods
from seqedit.pipeline.cli.handlers import CliError
from seqedit.pipeline.cli.hparams_import import read_hparams_file
from seqedit.schemas.loaders import load_requests
from seqedit.schemas.tables import EditRow
from seqedit.workers.editor import SequentialEditor
from seqedit.workers.tensor_files import write_safetensors


def edit_model(
    model: Path,
    method: str | None,
    hparams_file: Path,
    requests_file: Path,
    *,
    stats: Path | None,
    save_deltas: Path,
    save_model: Path | None = None,
    batch: bool = False,
    on_edit: Callable[[EditRow], None] | None = None,
) -> list[EditRow]:
    """Apply every request of `requests_file` in order (or, with `batch`, all of them as one
    batched step); write the deltas (and the model)."""
    method, hparams = read_hparams_file(hparams_file, method)
    _check_flags(method, hparams, hparams_file, stats=stats, batch=batch)
    requests = load_requests(requests_file).requests
    editor = SequentialEditor(
        str(model), method, hparams, stats_dir=str(stats) if stats else None, campaign="edit"
    )
    steps = [requests] if batch else [[request] for request in requests]
    rows = []
    for step, chunk in enumerate(steps):
        new = editor.edit_batch(chunk, step) if batch else [editor.edit(chunk[0], step)]
        for row in new:
            rows.append(row)
            if on_edit is not None:
                on_edit(row)
    tensors = editor.take_edit_log()
    metadata = {
        "method": method,
        "model": str(model),
        "n_edits": str(len(rows)),
        "n_steps": str(editor.n_steps),
    }
    write_safetensors(save_deltas, tensors, metadata)
    if save_model is not None:
        editor.save_model(save_model)
    return rows


def _check_flags(
    name: str, hparams: dict[str, Any], hparams_file: Path, *, stats: Path | None, batch: bool
) -> None:
    """Refuse, before the model is loaded, hparams or flags the method cannot work with."""
    method = get_method(name)
    if batch and not method.batched:
        batched = ", ".join(sorted(m.name for m in registered_methods().values() if m.batched))
        raise CliError(
            f"--batch: method {method.name!r} edits one request at a time; apply the "
            f"requests sequentially (methods with batches: {batched})"
        )
    config = validate_config(method.config_cls, hparams, where=f"{hparams_file}: hparams")
    if stats is None and method.uses_second_moment(config):
        raise CliError(
            f"method {method.name!r} with these hparams needs covariance stats: give --stats "
            "(build them with `seqedit stats build`)"
        )
