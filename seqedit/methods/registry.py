"""Every editing method, by name. Adding a method: one file plus one line here.

A method kept outside seqedit is registered without editing this file: name its record
in the environment, `SEQEDIT_METHODS=my_package.my_method:MY_METHOD` (several separated by
commas). Ray actors inherit the variable, so the editor and the evaluators find it too.
"""

from __future__ import annotations

import difflib
import importlib
import os

from seqedit.errors import UnknownMethodError
from seqedit.methods.alphaedit import ALPHAEDIT
from seqedit.methods.dpo import DPO
from seqedit.methods.ft import FT_L, FT_M
from seqedit.methods.grace import GRACE
from seqedit.methods.lora import LORA
from seqedit.methods.memit import MEMIT
from seqedit.methods.mend_method import MEND
from seqedit.methods.method import EditMethod
from seqedit.methods.rome import ROME
from seqedit.methods.serac import SERAC

METHODS: dict[str, EditMethod] = {
    method.name: method
    for method in (ROME, MEMIT, ALPHAEDIT, FT_L, FT_M, GRACE, LORA, DPO, MEND, SERAC)
}


PLUGINS_VARIABLE = "SEQEDIT_METHODS"
"""Environment variable naming method records outside seqedit (`module:ATTRIBUTE`, ...)."""


def registered_methods() -> dict[str, EditMethod]:
    """The built-in methods and those named by `SEQEDIT_METHODS`, by name."""
    methods = dict(METHODS)
    for spec in filter(None, (s.strip() for s in os.environ.get(PLUGINS_VARIABLE, "").split(","))):
        module_name, _, attribute = spec.partition(":")
        try:
            method = getattr(importlib.import_module(module_name), attribute)
        except (ImportError, AttributeError, ValueError) as exc:
            raise UnknownMethodError(
                f"{PLUGINS_VARIABLE}: cannot load {spec!r} (give module:ATTRIBUTE): {exc}"
            ) from exc
        if not isinstance(method, EditMethod):
            raise UnknownMethodError(f"{PLUGINS_VARIABLE}: {spec!r} is not an EditMethod")
        methods[method.name] = method
    return methods


def get_method(name: str) -> EditMethod:
    """The registered method `name`; an unknown name gets a did-you-mean."""
    key = name.strip().lower()
    methods = registered_methods()
    if key in methods:
        return methods[key]
    close = difflib.get_close_matches(key, methods, n=2)
    hint = f" — did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    registered = ", ".join(sorted(methods))
    raise UnknownMethodError(f"unknown method {name!r}{hint} (registered: {registered})")
