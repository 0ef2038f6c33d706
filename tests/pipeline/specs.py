"""Campaign spec files on the tiny testbed, for tests that run campaigns."""

from __future__ import annotations

from pathlib import Path

import yaml

from tests.conftest import TINY_LAYER


def write_spec(tmp_path: Path, testbed: Path, stats: Path | None, **fields: object) -> Path:
    """`tmp_path/spec.yaml`: a ROME campaign on `testbed` with one torch thread; `fields`
    replace or add top-level spec fields."""
    spec = {
        "name": "t",
        "model": str(testbed),
        "dataset": {"path": str(testbed / "requests.jsonl")},
        "method": "rome",
        "hparams": {"layer": TINY_LAYER, "context_templates": ["{}"]},
        "stats": str(stats) if stats else None,
        "resources": {"torch_threads": 1},
        **fields,
    }
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path
