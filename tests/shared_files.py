"""The files beside the repository that some tests need: ../shared/golden (the golden sets
of the reference implementations) and ../shared/data (the dev datasets).

Where one is absent the test skips, so that a checkout alone passes; under CI (`CI=true`,
as GitHub Actions and GitLab set it) it fails instead: a CI run must not go green by
skipping the reference checks.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

SHARED_DIR = Path(__file__).resolve().parents[1].parent / "shared"
"""../shared, relative to the repository root."""


def in_ci() -> bool:
    """Whether the environment says this is a CI run (`CI=true`, or 1/yes)."""
    return os.environ.get("CI", "").strip().lower() in {"true", "1", "yes"}


def require_shared(path: Path, what: str, hint: str = "") -> Path:
    """`path`, a shared file or folder; absent, skip the test, or under CI fail it.
    `what` names it in the message ("golden set"), `hint` says how to point to another."""
    if path.exists():
        return path
    message = f"{what} not found at {path}{f' ({hint})' if hint else ''}"
    if in_ci():
        pytest.fail(f"{message}; CI=true, so the shared files must be there", pytrace=False)
    pytest.skip(message)


def shared_data_dir() -> Path:
    """The shared dev data: $SEQEDIT_SHARED_DIR (or its data/), else ../shared/data."""
    override = os.environ.get("SEQEDIT_SHARED_DIR")
    if override:
        base = Path(override)
        return base / "data" if (base / "data").is_dir() else base
    return SHARED_DIR / "data"


def require_dev_file(name: str) -> Path:
    """The shared dev data file `name` (see `require_shared`)."""
    return require_shared(shared_data_dir() / name, "shared dev data", "set SEQEDIT_SHARED_DIR")
