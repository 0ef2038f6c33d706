"""Reading a YAML (or JSON) file that must hold a mapping, with errors that name the file.

A `.json` file is read as JSON: YAML 1.1 would read JSON's `5e-1` as a string.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml


def read_yaml_mapping(
    path: str | Path, what: str, error: type[ValueError] = ValueError
) -> dict[str, Any]:
    """The mapping in `path`; `what` names the file's role in errors ("campaign spec")."""
    file = Path(path)
    is_json = file.suffix.lower() == ".json"
    try:
        text = file.read_text(encoding="utf-8")
        raw = json.loads(text) if is_json else yaml.safe_load(text)
    except FileNotFoundError as exc:
        raise error(f"{file}: no such {what}") from exc
    except (yaml.YAMLError, json.JSONDecodeError) as exc:
        raise error(f"{file}: not valid {'JSON' if is_json else 'YAML'}: {exc}") from exc
    if not isinstance(raw, dict):
        raise error(f"{file}: a {what} is a mapping of field: value, got {type(raw).__name__}")
    return raw
