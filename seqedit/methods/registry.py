"""Every editing method, by name. Adding a method: one file plus one line here."""

from __future__ import annotations

import difflib

from seqedit.methods.alphaedit import ALPHAEDIT
from seqedit.methods.ft import FT_L, FT_M
from seqedit.methods.memit import MEMIT
from seqedit.methods.method import EditMethod
from seqedit.methods.rome import ROME

METHODS: dict[str, EditMethod] = {
    method.name: method for method in (ROME, MEMIT, ALPHAEDIT, FT_L, FT_M)
}


def get_method(name: str) -> EditMethod:
    """The registered method `name`; an unknown name gets a did-you-mean."""
    key = name.strip().lower()
    if key in METHODS:
        return METHODS[key]
    close = difflib.get_close_matches(key, METHODS, n=2)
    hint = f" — did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    raise ValueError(f"unknown method {name!r}{hint} (registered: {', '.join(sorted(METHODS))})")
