"""Loading a local Hugging Face model directory, and fingerprinting it for provenance."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.utils import logging as hf_logging

from seqedit.errors import SeqeditError

log = logging.getLogger(__name__)

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt")


class ModelDirError(SeqeditError, ValueError):
    """A model directory that cannot be used, with the path and what is wrong."""


def load_model(
    model_dir: str | Path, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer from a local directory (never from a hub).

    The tokenizer gets a pad token (its eos) when it has none, so batched scoring works.
    """
    path = Path(model_dir)
    if not (path / "config.json").is_file():
        raise ModelDirError(f"{path}: not a Hugging Face model directory (no config.json)")
    hf_logging.disable_progress_bar()
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=dtype)
    except OSError as exc:
        raise ModelDirError(f"{path}: cannot load model or tokenizer: {exc}") from exc
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.to(device)
    model.eval()
    for param in model.parameters():
        param.requires_grad_(False)
    return model, tokenizer


def model_fingerprint(model_dir: str | Path) -> str:
    """sha256 over the config and weight files of a model directory (names and bytes).

    Cheap enough for small models; large shards are hashed by name, size and mtime-free
    content of their first and last MiB so fingerprinting a 7B model takes milliseconds.
    """
    path = Path(model_dir)
    digest = hashlib.sha256()
    files = sorted(
        p for p in path.iterdir() if p.name == "config.json" or p.suffix in _WEIGHT_SUFFIXES
    )
    if not files:
        raise ModelDirError(f"{path}: no config or weight files to fingerprint")
    for file in files:
        digest.update(file.name.encode())
        size = file.stat().st_size
        digest.update(str(size).encode())
        with file.open("rb") as handle:
            if size <= 64 << 20:
                digest.update(handle.read())
            else:
                digest.update(handle.read(1 << 20))
                handle.seek(-(1 << 20), 2)
                digest.update(handle.read())
    return digest.hexdigest()
