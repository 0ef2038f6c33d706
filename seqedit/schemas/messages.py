"""Human wording for load errors: value descriptions, suggestions, pydantic translation."""

from __future__ import annotations

import difflib
from typing import Any, Final

from seqedit.schemas.requests import EditRequest

Loc = tuple[str | int, ...]


def shorten(text: str, width: int = 80) -> str:
    """`text` quoted with repr; strings longer than `width` are cut and end with '...'."""
    if len(text) > width:
        text = text[: width - 3] + "..."
    return repr(text)


def describe(value: Any) -> str:
    """A short human description of a JSON value's type and content, for error reasons."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"boolean {str(value).lower()}"
    if isinstance(value, int | float):
        return f"number {value}"
    if isinstance(value, str):
        return f"string {shorten(value)}" if value else "an empty string"
    if isinstance(value, list):
        return f"a list of {len(value)} item(s)"
    if isinstance(value, dict):
        keys = ", ".join(sorted(map(str, value))[:8])
        return f"an object with keys [{keys}]"
    return type(value).__name__


def suggest(name: str, options: list[str]) -> str:
    """' (did you mean 'x'?)' when `name` is close to one of `options`, else ''."""
    close = difflib.get_close_matches(name, options, n=2, cutoff=0.6)
    if not close:
        return ""
    return " (did you mean " + " or ".join(repr(c) for c in close) + "?)"


def source_path(loc: Loc, paths: dict[Loc, str]) -> str:
    """Map a pydantic error location to the dotted path of the source field."""
    for cut in range(len(loc), 0, -1):
        if loc[:cut] in paths:
            return ".".join([paths[loc[:cut]], *map(str, loc[cut:])])
    return ".".join(map(str, loc))


_TYPE_NAMES: Final = {
    "string_type": "a string",
    "int_type": "an integer",
    "int_parsing": "an integer",
    "int_from_float": "an integer",
    "list_type": "a list",
    "dict_type": "an object",
    "model_type": "an object",
}


def pydantic_reason(error: dict[str, Any]) -> str:
    """A human reason for one pydantic error dict."""
    kind, given = error["type"], error.get("input")
    if kind == "missing":
        return "required field is missing"
    if kind in _TYPE_NAMES:
        return f"expected {_TYPE_NAMES[kind]}, got {describe(given)}"
    if kind == "string_too_short":
        return "must not be empty"
    if kind == "greater_than_equal":
        return f"must be >= {error['ctx']['ge']}, got {describe(given)}"
    if kind == "extra_forbidden":
        field = str(error["loc"][-1])
        return "unknown field" + suggest(field, list(EditRequest.model_fields))
    if kind == "value_error":
        message = str(error["ctx"]["error"])
        return f"{message}: {shorten(given)}" if isinstance(given, str) else message
    return str(error["msg"])
