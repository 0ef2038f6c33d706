"""`seqedit hparams import`: hyperparameter files of EasyEdit and of the reference code, ours.

Two source formats are read:
  * EasyEdit (zjunlp/EasyEdit `hparams/<ALG>/<model>.yaml`): a mapping with `alg_name`;
  * reference (kmeng01/rome, kmeng01/memit, jianghoucheng/AlphaEdit `hparams/<ALG>/*.json`):
    a mapping without it; the method comes from the caller or from the path.
Every source field is kept (our field of the same name), renamed, folded into
`module_names`, or dropped with a reason; any other field is an error. The full mapping is
written out in docs/hparams.md. Our format is `{method, hparams}`: the two keys a campaign
spec takes, and what `seqedit edit --hparams` reads (see `read_hparams_file`).
"""

from __future__ import annotations

import difflib
import re
import textwrap
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field

from seqedit.methods.arch import ModuleNames, module_names_for_type
from seqedit.methods.config import HparamsError, validate_config
from seqedit.methods.registry import get_method
from seqedit.schemas.yaml_file import read_yaml_mapping

SourceFormat = Literal["easyedit", "reference"]

TEMPLATE_FIELDS = (
    "rewrite_module_tmp",
    "layer_module_tmp",
    "mlp_module_tmp",
    "attn_module_tmp",
    "ln_f_module",
    "lm_head_module",
)
"""Module name fields of the sources; ours live in `module_names` (a `ModuleNames`)."""

_STATS = "covariance comes from `seqedit stats build` (see --corpus), given as `stats:`"
DROPPED_ANY_METHOD: dict[str, str] = {
    "alg_name": "names the method: it becomes `method`",
    "model_name": "the campaign's model (`model:` / `seqedit edit --model`); read here only to "
    "recognise the model family",
    "device": "chosen by the campaign's resources",
    "model_parallel": "device placement is chosen by the campaign's resources",
    "fp16": "the dtype is the campaign's model's",
    "stats_dir": _STATS,
    "mom2_dataset": _STATS,
    "mom2_n_samples": _STATS,
    "mom2_dtype": "the covariance dtype is `seqedit stats build --dtype`",
    "P_loc": "EasyEdit's cache of the null-space projector; seqedit computes P from the covariance",
    "layer_selection": "read by no reference code: every listed layer is edited",
    "max_length": "EasyEdit's tokenizer truncation; seqedit does not truncate edit prompts",
    "batch_size": "requests per call in the source code; seqedit applies one edit per step",
}
"""Source fields dropped whatever the method, with the reason."""

DROPPED_BY_METHOD: dict[str, dict[str, str]] = {
    "alphaedit": {
        "mom2_update_weight": "read by no AlphaEdit code: preservation is the null-space "
        "projection (nullspace_threshold) and L2",
    },
    "ft": {
        "kl_factor": "read by no FT code (EasyEdit's or the reference's)",
        "wd_power_law": "null in the source: no weight-decay scaling (other values are refused)",
    },
}
"""Source fields dropped for one method family ("ft" = ft-l and ft-m)."""

RENAMED_BY_METHOD: dict[str, dict[str, str]] = {
    "rome": {"layers": "layer"},
    "ft": {"layers": "layer", "objective_optimization": "objective"},
}
"""Source field -> our field, where the names differ ("ft" = ft-l and ft-m)."""

EASYEDIT_METHODS: dict[str, str] = {"ROME": "rome", "MEMIT": "memit", "AlphaEdit": "alphaedit"}
"""EasyEdit `alg_name` -> our method (FT is chosen by `objective_optimization`)."""

FT_OBJECTIVES: dict[str, str] = {"prompt_last": "ft-l", "target_new": "ft-m"}

PATH_METHODS: dict[str, str] = {
    "rome": "rome",
    "memit": "memit",
    "alphaedit": "alphaedit",
    "ft": "ft-l",
    "ft-l": "ft-l",
    "ft-m": "ft-m",
}
"""Path components (case-insensitive) naming the method of a reference file. The reference
FT (kmeng01) scores the target at the last prompt token: ft-l."""

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

_EXPONENT_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+")
"""A number YAML 1.1 reads as text (`5e-1`: no dot); EasyEdit converts these to floats."""


class ImportedHparams(BaseModel):
    """One imported file: our method and hparams, and what became of each source field."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    method: str = Field(description="Our registry name ('rome', 'ft-m', ...).")
    source_format: SourceFormat
    hparams: dict[str, Any] = Field(description="Validated by the method's config class.")
    dropped: dict[str, str] = Field(default_factory=dict, description="Source field -> why.")
    renamed: dict[str, str] = Field(default_factory=dict, description="Source field -> ours.")
    notes: list[str] = Field(default_factory=list, description="Values that were converted.")


class _Result:
    """What became of the source fields, filled in as the import goes."""

    def __init__(self) -> None:
        self.dropped: dict[str, str] = {}
        self.renamed: dict[str, str] = {}
        self.notes: list[str] = []


def _family_key(method: str) -> str:
    return "ft" if method.startswith("ft-") else method


def _read_source(path: Path) -> dict[str, Any]:
    return read_yaml_mapping(path, "hparams file", HparamsError)


def _method_from_path(path: Path) -> str | None:
    parts = [*re.split(r"[_.]", path.stem), *reversed(path.parent.parts)]
    for part in parts:
        if part.lower() in PATH_METHODS:
            return PATH_METHODS[part.lower()]
    return None


def _detected_method(path: Path, source: dict[str, Any], fmt: SourceFormat) -> str | None:
    if fmt == "reference":
        return _method_from_path(path)
    alg = source["alg_name"]
    if alg in EASYEDIT_METHODS:
        return EASYEDIT_METHODS[alg]
    if alg != "FT":
        known = [*EASYEDIT_METHODS, "FT"]
        close = difflib.get_close_matches(str(alg), known, n=1, cutoff=0.5)
        hint = f" — did you mean {close[0]!r}?" if close else ""
        raise HparamsError(
            f"{path}: field 'alg_name': {alg!r} cannot be imported{hint} "
            f"(supported: {', '.join(known)})"
        )
    objective = source.get("objective_optimization")
    if objective is None:
        return None
    if objective not in FT_OBJECTIVES:
        close = difflib.get_close_matches(str(objective), FT_OBJECTIVES, n=1)
        hint = f" — did you mean {close[0]!r}?" if close else ""
        raise HparamsError(
            f"{path}: field 'objective_optimization': {objective!r} is neither "
            f"{' nor '.join(repr(o) for o in FT_OBJECTIVES)}{hint}"
        )
    return FT_OBJECTIVES[objective]


def _choose_method(
    path: Path, source: dict[str, Any], fmt: SourceFormat, method: str | None
) -> str:
    detected = _detected_method(path, source, fmt)
    is_ft = fmt == "easyedit" and source["alg_name"] == "FT"
    if method is None:
        if detected is None:
            how = (
                "an EasyEdit FT file without objective_optimization"
                if is_ft
                else "a reference file has no alg_name and no ROME/MEMIT/AlphaEdit/FT "
                "directory or file name in its path"
            )
            raise HparamsError(f"{path}: cannot tell the method ({how}); give --method")
        return detected
    chosen = get_method(method).name
    if fmt == "reference":
        where = "its path"
    else:
        where = "field " + repr("objective_optimization" if is_ft else "alg_name")
    if detected is not None and detected != chosen:
        raise HparamsError(f"{path}: {where}: the file is {detected!r} but --method is {chosen!r}")
    if is_ft and not chosen.startswith("ft-"):
        raise HparamsError(f"{path}: field 'alg_name': 'FT' cannot be imported as {chosen!r}")
    return chosen


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


def _import_templates(path: Path, source: dict[str, Any], result: _Result) -> ModuleNames | None:
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


def _single_layer(path: Path, value: Any, method: str) -> int:
    layers = [value] if isinstance(value, int) else value
    if not isinstance(layers, list) or not all(isinstance(x, int) for x in layers):
        raise HparamsError(f"{path}: field 'layers': a list of layer indices, got {value!r}")
    if len(layers) != 1:
        raise HparamsError(
            f"{path}: field 'layers': {method} edits one layer, the file lists {layers}; keep one"
            + (" (or import the file as memit)" if method == "rome" else "")
        )
    return layers[0]


def _convert(path: Path, method: str, source: dict[str, Any], result: _Result) -> dict[str, Any]:
    key = _family_key(method)
    config_fields = set(get_method(method).config_cls.model_fields) - {"module_names"}
    renames = RENAMED_BY_METHOD.get(key, {})
    drops = DROPPED_ANY_METHOD | DROPPED_BY_METHOD.get(key, {})
    known = sorted(config_fields | set(renames) | set(drops) | set(TEMPLATE_FIELDS))
    unknown = [field for field in source if field not in known]
    if unknown:
        lines = []
        for field in unknown:
            close = difflib.get_close_matches(str(field), known, n=2, cutoff=0.6)
            hint = f" — did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
            lines.append(f"  field {field!r}: not a {method} hparam of this format{hint}")
        raise HparamsError(f"{path}: {len(unknown)} unknown field(s)\n" + "\n".join(lines))
    if source.get("wd_power_law") is not None:
        raise HparamsError(f"{path}: field 'wd_power_law': not supported by seqedit's {method}")
    hparams: dict[str, Any] = {}
    for field, value in source.items():
        if field in TEMPLATE_FIELDS:
            continue
        if field in renames:
            ours = renames[field]
            if ours in source:
                raise HparamsError(f"{path}: field {field!r}: both {field!r} and {ours!r} given")
            result.renamed[field] = ours
            if field == "layers":
                value = _single_layer(path, value, method)
                result.notes.append(f"layers: {source[field]} -> layer: {value}")
            hparams[ours] = value
        elif field in drops and field not in config_fields:
            result.dropped[field] = drops[field]
        else:
            hparams[field] = value
    if key == "ft":
        for field, off in (("norm_constraint", None), ("weight_decay", 0.0)):
            if hparams.get(field) is False:
                hparams[field] = off
                result.notes.append(f"{field}: false -> {'null' if off is None else off}")
    names = _import_templates(path, source, result)
    if names is not None:
        hparams["module_names"] = names.model_dump()
    return hparams


def _numbers_from_text(source: dict[str, Any], result: _Result) -> dict[str, Any]:
    converted = {
        k: float(v)
        for k, v in source.items()
        if isinstance(v, str) and _EXPONENT_NUMBER.fullmatch(v)
    }
    if converted:
        result.notes.append(
            f"{', '.join(converted)}: YAML reads numbers like 5e-1 as text; read as numbers, "
            "as EasyEdit does"
        )
    return source | converted


def import_hparams(path: Path, method: str | None = None) -> ImportedHparams:
    """Import an EasyEdit YAML or a reference JSON hparams file as our method's hparams.

    `method` (a registry name) is needed for a reference file whose path names no method
    and for an EasyEdit FT file without `objective_optimization`; where the file names its
    method too, the two must agree. Raises HparamsError (naming the file and the field) for
    unknown fields, values that do not convert, and hparams our config refuses.
    """
    path = Path(path)
    result = _Result()
    source = _read_source(path)
    fmt: SourceFormat = "easyedit" if "alg_name" in source else "reference"
    if path.suffix.lower() != ".json":
        source = _numbers_from_text(source, result)
    chosen = _choose_method(path, source, fmt, method)
    hparams = _convert(path, chosen, source, result)
    config = validate_config(
        get_method(chosen).config_cls, hparams, where=f"{path} imported as {chosen} hparams"
    )
    ours = config.model_dump(mode="json", exclude_unset=True)
    if "module_names" in ours:  # last: the method's own fields read first
        ours["module_names"] = ours.pop("module_names")
    return ImportedHparams(
        method=chosen,
        source_format=fmt,
        hparams=ours,
        dropped=result.dropped,
        renamed=result.renamed,
        notes=result.notes,
    )


class _Dumper(yaml.SafeDumper):
    """Block mappings, flow lists: `layers: [4, 5]` under a block `hparams:`."""


_Dumper.add_representer(
    list, lambda dumper, data: dumper.represent_sequence("tag:yaml.org,2002:seq", data, True)
)


def _by_reason(dropped: dict[str, str]) -> list[tuple[str, list[str]]]:
    groups: dict[str, list[str]] = {}
    for field, why in dropped.items():
        groups.setdefault(why, []).append(field)
    return list(groups.items())


def _comment(entry: str) -> list[str]:
    parts = textwrap.wrap(entry, 94, break_long_words=False, subsequent_indent="  ")
    return [f"#   {part}" for part in parts]


def render_yaml(imported: ImportedHparams, source: Path) -> str:
    """Our YAML of an import: a comment block (renamed, dropped, converted), then
    `method:` and `hparams:`."""
    lines = [f"# Imported by `seqedit hparams import` from {source} ({imported.source_format})."]
    sections = (
        ("Renamed", [f"{k} -> {v}" for k, v in imported.renamed.items()]),
        ("Dropped", [f"{', '.join(ks)}: {why}" for why, ks in _by_reason(imported.dropped)]),
        ("Converted", imported.notes),
    )
    for title, entries in sections:
        if entries:
            lines.append(f"# {title}:")
            for entry in entries:
                lines.extend(_comment(entry))
    body = yaml.dump(
        {"method": imported.method, "hparams": imported.hparams},
        Dumper=_Dumper,
        sort_keys=False,
        default_flow_style=False,
    )
    return "\n".join(lines) + "\n" + body


def read_hparams_file(path: Path, method: str | None) -> tuple[str, dict[str, Any]]:
    """(method, hparams mapping) of a `seqedit edit --hparams` file.

    The file is either a flat mapping of config fields (then `method` must be given), or
    our `{method, hparams}` mapping (what `seqedit hparams import` writes), whose method
    must agree with `method` when both are given.
    """
    raw = read_yaml_mapping(path, "hparams file", HparamsError)
    if "hparams" not in raw or not set(raw) <= {"method", "hparams"}:
        if method is None:
            raise HparamsError(
                f"{path}: a flat hparams file does not name its method; pass --method "
                "(or write {method: ..., hparams: {...}}, as `seqedit hparams import` does)"
            )
        return get_method(method).name, raw
    if not isinstance(raw["hparams"], dict):
        raise HparamsError(f"{path}: field 'hparams': a mapping of config fields")
    named = raw.get("method")
    if named is None and method is None:
        raise HparamsError(f"{path}: field 'method' is missing; add it or pass --method")
    if (
        named is not None
        and method is not None
        and (get_method(str(named)).name != get_method(method).name)
    ):
        raise HparamsError(f"{path}: field 'method': the file is for {named!r}, not {method!r}")
    return get_method(str(method or named)).name, raw["hparams"]
