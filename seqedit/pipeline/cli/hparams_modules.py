"""Module names in imported hparams files: the six `*_module_tmp` / `*_module` fields of
EasyEdit and reference files, compared with seqedit's built-in names for the model family
(docs/hparams.md, "Module names"). Used by `hparams_import`."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from seqedit.methods.arch import ModuleNames, module_names_for_type
from seqedit.methods.config import HparamsError

TEMPLATE_FIELDS = (
    "rewrite_module_tmp",
    "layer_module_tmp",
    "mlp_module_tmp",
    "attn_module_tmp",
    "ln_f_module",
    "lm_head_module",
)
"""Module name fields of the sources; ours live in `module_names` (a `ModuleNames`)."""

_FAMILY_PATTERNS: tuple[tuple[str, str], ...] = (
    (r"gpt-?neox|pythia", "gpt_neox"),
    (r"gpt-?j", "gptj"),
    (r"gpt2", "gpt2"),
    (r"llama", "llama"),
    (r"mistral", "mistral"),
    (r"qwen-?2", "qwen2"),
)
"""Regex on the last component of `model_name` (lowercase) -> our `model_type`."""

_TIED = "the file reads the head's weight from the tied input embedding; seqedit calls the head"
HEAD_ALIASES: dict[str, dict[str, str]] = {
    "gpt2": {"transformer.wte": _TIED},
    "gpt_neox": {"embed_out": "GPT-NeoX's head before transformers 5"},
    "llama": {"model.embed_tokens": _TIED},
    "mistral": {"model.embed_tokens": _TIED},
    "qwen2": {"model.embed_tokens": _TIED},
}
"""Per model family: source `lm_head_module` values that mean the built-in head, and why."""


class ImportNotes:
    """What became of the source fields, filled in as the import goes."""

    def __init__(self) -> None:
        self.dropped: dict[str, str] = {}
        self.renamed: dict[str, str] = {}
        self.notes: list[str] = []


def _family_from_name(model_name: Any) -> str | None:
    if not isinstance(model_name, str) or not model_name.strip():
        return None
    base = model_name.replace("\\", "/").rstrip("/").rsplit("/", 1)[-1].lower()
    found = {family for pattern, family in _FAMILY_PATTERNS if re.search(pattern, base)}
    return found.pop() if len(found) == 1 else None


def _family_from_templates(templates: dict[str, str]) -> str | None:
    rewrite = templates.get("rewrite_module_tmp")
    for _pattern, family in _FAMILY_PATTERNS:
        if module_names_for_type(family).rewrite_module_tmp == rewrite:
            return family
    return None


def _model_family(
    path: Path, source: dict[str, Any], templates: dict[str, str]
) -> tuple[str | None, str]:
    """(our model_type, how it was recognised) of a source file; None when unclear.

    By `model_name` when the file has one (an unknown name: None); else by the file name
    (the reference repos name their files by model); else by `rewrite_module_tmp`.
    """
    if source.get("model_name"):
        return _family_from_name(source["model_name"]), "recognised from model_name"
    family = _family_from_name(path.stem)
    if family is not None:
        return family, "recognised from the file name"
    return _family_from_templates(templates), "recognised from rewrite_module_tmp"


def import_templates(path: Path, source: dict[str, Any], result: ImportNotes) -> ModuleNames | None:
    """Our `module_names` from a source's module fields (None: the built-in names do)."""
    given = {k: source[k] for k in TEMPLATE_FIELDS if k in source}
    if not given:
        return None
    for field, value in given.items():
        if not isinstance(value, str):
            raise HparamsError(f"{path}: field {field!r}: a module name is text, got {value!r}")
    rewrite = given.get("rewrite_module_tmp")
    if rewrite is not None and rewrite.endswith(".weight"):
        given["rewrite_module_tmp"] = rewrite.removesuffix(".weight")
        result.notes.append(
            f"rewrite_module_tmp: {rewrite!r} read as the module {given['rewrite_module_tmp']!r} "
            "(seqedit trains the module's weight)"
        )
    family, how = _model_family(path, source, given)
    builtin = module_names_for_type(family) if family else None
    head = given.get("lm_head_module")
    if builtin is not None and head in HEAD_ALIASES.get(family or "", {}):
        given["lm_head_module"] = builtin.lm_head_module
        why = HEAD_ALIASES[family or ""][head]
        result.notes.append(f"lm_head_module: {head!r} read as {builtin.lm_head_module!r} ({why})")
    if builtin is not None and all(getattr(builtin, k) == v for k, v in given.items()):
        for field in given:
            result.dropped[field] = f"same as the built-in names for {family} ({how})"
        return None
    missing = [k for k in TEMPLATE_FIELDS if k not in given]
    if missing and builtin is None:
        raise HparamsError(
            f"{path}: field {missing[0]!r}: custom module names need all of "
            f"{', '.join(TEMPLATE_FIELDS)}; missing {', '.join(missing)}"
        )
    for field in given:
        result.renamed[field] = f"module_names.{field}"
    if builtin is None:
        result.notes.append(
            "module_names.rewrite_weight_transposed: false (nn.Linear storage) — the model "
            "family is unknown; set true for a GPT-2-style Conv1D"
        )
    for field in missing:
        result.notes.append(f"module_names.{field}: not in the file; the built-in {family} name")
    fields = {k: given.get(k, getattr(builtin, k, None)) for k in TEMPLATE_FIELDS}
    return ModuleNames(**fields, rewrite_weight_transposed=family == "gpt2")
