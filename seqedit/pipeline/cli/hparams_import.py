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

from seqedit.methods.config import HparamsError, validate_config
from seqedit.methods.method import HparamsImport
from seqedit.methods.registry import get_method, registered_methods
from seqedit.pipeline.cli.hparams_modules import TEMPLATE_FIELDS, ImportNotes, import_templates
from seqedit.schemas.yaml_file import read_yaml_mapping

SourceFormat = Literal["easyedit", "reference"]

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


def _imports() -> dict[str, HparamsImport]:
    """Registered method -> how its files import (`EditMethod.hparams_import`)."""
    methods = registered_methods()
    return {name: m.hparams_import for name, m in methods.items() if m.hparams_import}


def _sharing(alg: str) -> dict[str, HparamsImport]:
    """The methods whose EasyEdit `alg_name` is `alg` (FT: ft-l and ft-m)."""
    return {name: how for name, how in _imports().items() if how.easyedit_alg == alg}


def _selector(alg: str) -> str | None:
    """The source field choosing among the methods sharing `alg` (None: `alg` tells)."""
    fields = {how.selector[0] for how in _sharing(alg).values() if how.selector}
    return fields.pop() if len(fields) == 1 else None


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


def _read_source(path: Path) -> dict[str, Any]:
    return read_yaml_mapping(path, "hparams file", HparamsError)


def _method_from_path(path: Path) -> str | None:
    """The method a reference file's path names (`HparamsImport.path_names`): the file name
    split at `_` and `.`, then the directories from the innermost out."""
    named = {n.lower(): method for method, how in _imports().items() for n in how.path_names}
    parts = [*re.split(r"[_.]", path.stem), *reversed(path.parent.parts)]
    for part in parts:
        if part.lower() in named:
            return named[part.lower()]
    return None


def _detected_method(path: Path, source: dict[str, Any], fmt: SourceFormat) -> str | None:
    if fmt == "reference":
        return _method_from_path(path)
    alg = source["alg_name"]
    sharing = _sharing(alg)
    if not sharing:
        known = list(dict.fromkeys(h.easyedit_alg for h in _imports().values() if h.easyedit_alg))
        close = difflib.get_close_matches(str(alg), known, n=1, cutoff=0.5)
        hint = f" — did you mean {close[0]!r}?" if close else ""
        raise HparamsError(
            f"{path}: field 'alg_name': {alg!r} cannot be imported{hint} "
            f"(supported: {', '.join(known)})"
        )
    selector = _selector(alg)
    if selector is None:
        return next(iter(sharing))
    value = source.get(selector)
    if value is None:
        return None
    by_value = {how.selector[1]: name for name, how in sharing.items() if how.selector}
    if value not in by_value:
        close = difflib.get_close_matches(str(value), by_value, n=1)
        hint = f" — did you mean {close[0]!r}?" if close else ""
        raise HparamsError(
            f"{path}: field {selector!r}: {value!r} is neither "
            f"{' nor '.join(repr(o) for o in by_value)}{hint}"
        )
    return by_value[value]


def _choose_method(
    path: Path, source: dict[str, Any], fmt: SourceFormat, method: str | None
) -> str:
    detected = _detected_method(path, source, fmt)
    alg = source["alg_name"] if fmt == "easyedit" else None
    selector = _selector(alg) if alg is not None else None
    if method is None:
        if detected is None:
            names = dict.fromkeys(h.path_names[0] for h in _imports().values() if h.path_names)
            how = (
                f"an EasyEdit {alg} file without {selector}"
                if selector
                else f"a reference file has no alg_name and no {'/'.join(names)} "
                "directory or file name in its path"
            )
            raise HparamsError(f"{path}: cannot tell the method ({how}); give --method")
        return detected
    chosen = get_method(method).name
    where = "its path" if fmt == "reference" else "field " + repr(selector or "alg_name")
    if detected is not None and detected != chosen:
        raise HparamsError(f"{path}: {where}: the file is {detected!r} but --method is {chosen!r}")
    if alg is not None and chosen not in _sharing(alg):
        raise HparamsError(f"{path}: field 'alg_name': {alg!r} cannot be imported as {chosen!r}")
    return chosen


def _single_layer(path: Path, value: Any, method: str, hint: str) -> int:
    layers = [value] if isinstance(value, int) else value
    if not isinstance(layers, list) or not all(isinstance(x, int) for x in layers):
        raise HparamsError(f"{path}: field 'layers': a list of layer indices, got {value!r}")
    if len(layers) != 1:
        raise HparamsError(
            f"{path}: field 'layers': {method} edits one layer, the file lists {layers}; keep one"
            + hint
        )
    return layers[0]


def _convert(
    path: Path, method: str, source: dict[str, Any], result: ImportNotes
) -> dict[str, Any]:
    how = get_method(method).hparams_import or HparamsImport()
    config_fields = set(get_method(method).config_cls.model_fields) - {"module_names"}
    renames, drops = dict(how.renamed), DROPPED_ANY_METHOD | dict(how.dropped)
    converted = set(how.converted)
    training = f"a training field: `seqedit train {method} --config` reads it (docs/hparams.md)"
    drops |= {name: training for name in how.training}
    known = sorted(
        config_fields
        | set(renames)
        | set(drops)
        | converted
        | set(how.fixed)
        | set(TEMPLATE_FIELDS)
    )
    unknown = [field for field in source if field not in known]
    if unknown:
        lines = []
        for field in unknown:
            close = difflib.get_close_matches(str(field), known, n=2, cutoff=0.6)
            hint = f" — did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
            lines.append(f"  field {field!r}: not a {method} hparam of this format{hint}")
        raise HparamsError(f"{path}: {len(unknown)} unknown field(s)\n" + "\n".join(lines))
    for field in how.null_only:
        if source.get(field) is not None:
            raise HparamsError(f"{path}: field {field!r}: not supported by seqedit's {method}")
    hparams: dict[str, Any] = {}
    for field, value in source.items():
        if field in TEMPLATE_FIELDS:
            continue
        if field in renames:
            ours = renames[field]
            if ours in source:
                raise HparamsError(f"{path}: field {field!r}: both {field!r} and {ours!r} given")
            result.renamed[field] = ours
            if (field, ours) == ("layers", "layer"):
                value = _single_layer(path, value, method, how.one_layer_hint)
                result.notes.append(f"layers: {source[field]} -> layer: {value}")
            hparams[ours] = value
        elif field in converted:
            for ours, part in _converted(path, field, value, source, how, result).items():
                merged = isinstance(part, dict) and isinstance(hparams.get(ours), dict)
                hparams[ours] = {**hparams[ours], **part} if merged else part
        elif field in how.fixed:
            if value != how.fixed[field]:
                raise HparamsError(
                    f"{path}: field {field!r}: {value!r} is not supported; seqedit's {method} "
                    f"implements {field}: {how.fixed[field]!r} only"
                )
            result.dropped[field] = f"what seqedit's {method} does ({field}: {value!r})"
        elif field in drops and field not in config_fields:
            result.dropped[field] = drops[field]
        else:
            hparams[field] = value
    for field, off in how.false_means.items():
        if hparams.get(field) is False:
            hparams[field] = off
            result.notes.append(f"{field}: false -> {'null' if off is None else off}")
    names = import_templates(path, source, result)
    if names is not None:
        hparams["module_names"] = names.model_dump()
    return hparams


def _converted(
    path: Path,
    field: str,
    value: Any,
    source: dict[str, Any],
    how: HparamsImport,
    result: ImportNotes,
) -> dict[str, Any]:
    """Our fields from a source field the method converts (`HparamsImport.converted`)."""
    try:
        ours, note = how.converted[field](value)
    except ValueError as exc:
        raise HparamsError(f"{path}: field {field!r}: {exc}") from None
    for name in ours:
        if name in source:
            raise HparamsError(f"{path}: field {field!r}: both {field!r} and {name!r} given")
    result.renamed[field] = ", ".join(ours)
    result.notes.append(note)
    return ours


def _numbers_from_text(source: dict[str, Any], result: ImportNotes) -> dict[str, Any]:
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
    result = ImportNotes()
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
