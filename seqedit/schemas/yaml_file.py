"""Reading a YAML (or JSON) file that must hold a mapping, with errors that name the file."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml


def read_yaml_mapping(
    path: str | Path, what: str, error: type[ValueError] = ValueError
) -> dict[str, Any]:
    """The mapping in `path`; `what` names the file's role in errors ("campaign spec")."""
    file = Path(path)
    try:
        raw = yaml.safe_load(file.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise error(f"{file}: no such {what}") from exc
    except yaml.YAMLError as exc:
        raise error(f"{file}: not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise error(f"{file}: a {what} is a mapping of field: value, got {type(raw).__name__}")
    return raw
