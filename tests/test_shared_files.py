"""A test that needs ../shared skips without it, and fails without it under CI=true."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.golden import require_golden
from tests.shared_files import require_dev_file, require_shared


@pytest.mark.parametrize("ci", [None, "", "false", "0"])
def test_missing_shared_files_skip_outside_ci(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, ci: str | None
) -> None:
    if ci is None:
        monkeypatch.delenv("CI", raising=False)
    else:
        monkeypatch.setenv("CI", ci)
    with pytest.raises(pytest.skip.Exception, match="golden set not found"):
        require_shared(tmp_path / "missing", "golden set")


@pytest.mark.parametrize("ci", ["true", "True", "1"])
def test_missing_shared_files_fail_under_ci(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, ci: str
) -> None:
    monkeypatch.setenv("CI", ci)
    with pytest.raises(pytest.fail.Exception, match="CI=true"):
        require_shared(tmp_path / "missing", "golden set")


def test_present_shared_files_are_returned_under_ci(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CI", "true")
    assert require_shared(tmp_path, "golden set") == tmp_path


def test_golden_set_and_dev_data_follow_the_rule(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SEQEDIT_GOLDEN_DIR", str(tmp_path / "no-golden"))
    monkeypatch.setenv("SEQEDIT_SHARED_DIR", str(tmp_path / "no-shared"))
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="no-golden"):
        require_golden()
    with pytest.raises(pytest.fail.Exception, match="no-shared"):
        require_dev_file("counterfact_dev.json")
    monkeypatch.delenv("CI")
    with pytest.raises(pytest.skip.Exception, match="no-golden"):
        require_golden()
    with pytest.raises(pytest.skip.Exception, match="no-shared"):
        require_dev_file("counterfact_dev.json")
