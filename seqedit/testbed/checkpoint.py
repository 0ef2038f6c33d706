"""Resumable testbed training: the loop's state saved at each recall check, so a build that
is killed (a 10,000-fact testbed trains for hours on a laptop) continues where it stopped
and ends with the same weights as an uninterrupted build.

The checkpoint holds the model, AdamW and schedule states, where the packed-row stream
stands (`PackedRows.state`), the losses and the recall history. It is written next to the
model as `CHECKPOINT_FILE` by an atomic rename, and is only resumed when its fingerprint
(config, tokenizer, statements and English) matches the build's; the build removes it once
the testbed is complete.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final

import torch
from pydantic import BaseModel, ConfigDict
from transformers import PreTrainedModel, PreTrainedTokenizerFast

from seqedit.files import write_atomic
from seqedit.testbed.text import PackedRows
from seqedit.testbed.world import TestbedError

log = logging.getLogger(__name__)

CHECKPOINT_FILE: Final = "training-checkpoint.pt"


def build_fingerprint(
    config_json: str,
    tokenizer: PreTrainedTokenizerFast,
    statements: Sequence[str],
    english: Sequence[str],
) -> str:
    """sha256 over what decides the training stream: the config, the tokenizer, the
    statements and the English sentences (in order)."""
    digest = hashlib.sha256(config_json.encode())
    digest.update(tokenizer.backend_tokenizer.to_str().encode())
    for part in (statements, english):
        digest.update(f"\x00{len(part)}\x00".encode())
        for text in part:
            digest.update(text.encode() + b"\x00")
    return digest.hexdigest()


class TrainingProgress(BaseModel):
    """The loop's own counters at a checkpoint (the tensors travel beside them)."""

    model_config = ConfigDict(frozen=True)

    step: int
    seconds: float
    losses: list[float]
    history: list[dict[str, Any]]


class TrainingCheckpoint:
    """Save and resume one build's training loop at `path` for `fingerprint`."""

    def __init__(self, path: Path, fingerprint: str) -> None:
        self.path, self.fingerprint = path, fingerprint

    def save(
        self,
        progress: TrainingProgress,
        model: PreTrainedModel,
        optimizer: torch.optim.Optimizer,
        schedule: torch.optim.lr_scheduler.LRScheduler,
        rows: PackedRows,
    ) -> None:
        """Write the state atomically (a kill mid-write leaves the previous checkpoint)."""
        state = {
            "fingerprint": self.fingerprint,
            "progress": progress.model_dump(),
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "schedule": schedule.state_dict(),
            "rows": rows.state(),
        }

        def write(tmp: Path) -> None:
            with tmp.open("wb") as handle:  # torch's zip writer refuses the ".tmp-" name
                torch.save(state, handle)

        write_atomic(self.path, write)

    def resume(
        self,
        model: PreTrainedModel,
        optimizer: torch.optim.Optimizer,
        schedule: torch.optim.lr_scheduler.LRScheduler,
        rows: PackedRows,
    ) -> TrainingProgress | None:
        """Restore a matching checkpoint into the given objects and return its progress;
        None (and a fresh start) when there is none or it belongs to another build.
        Raises TestbedError naming the file when it cannot be read."""
        if not self.path.is_file():
            return None
        try:
            state = torch.load(self.path, map_location="cpu", weights_only=True)
            fingerprint = state["fingerprint"]
        except Exception as err:  # torch raises several types for a damaged file
            raise TestbedError(
                f"{self.path}: unreadable training checkpoint ({err}); delete it to train "
                "from the start"
            ) from err
        if fingerprint != self.fingerprint:
            log.warning("%s belongs to another build (config or data changed); training "
                        "from the start", self.path)  # fmt: skip
            return None
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        rows.restore(state["rows"])
        progress = TrainingProgress.model_validate(state["progress"])
        log.info("%s: resuming training after step %d", self.path, progress.step)
        return progress

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)
