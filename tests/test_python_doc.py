"""docs/python.md runs top to bottom as a notebook would: its shell cells through the
`seqedit` command, its Python cells in one namespace, in order, in a fresh directory."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import ray

from seqedit.pipeline.cli.main import main

PAGE = Path(__file__).resolve().parents[1] / "docs" / "python.md"
CELLS = re.findall(r"```(bash|python)\n(.*?)```", PAGE.read_text(encoding="utf-8"), re.DOTALL)


def test_the_page_has_the_cells_the_issue_asks_for() -> None:
    code = "\n".join(body for kind, body in CELLS if kind == "python")
    for needed in (
        "Campaign.from_kwargs",
        ".run()",
        ".to_pandas()",
        ".plot()",
        ".report()",
        "seqedit.edit(",
        "EasyEditor(",
        "sequential_edit=True",
        "assert ours == cli",
    ):
        assert needed in code, f"docs/python.md has no cell with {needed}"  # fmt: skip


@pytest.mark.slow
def test_every_cell_of_the_python_page_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, object] = {"__name__": "__notebook__"}
    try:
        for number, (kind, body) in enumerate(CELLS):
            if kind == "bash":
                for line in body.strip().splitlines():
                    argv = shlex.split(line)
                    assert argv[0] == "seqedit", f"shell cells run seqedit only: {line}"
                    assert main(argv[1:]) in (0, None), f"`{line}` failed"
                continue
            exec(compile(body, f"docs/python.md cell {number}", "exec"), namespace)
    finally:
        ray.shutdown()
    out = capsys.readouterr().out
    assert "done" in out  # the campaign's state
    assert (tmp_path / "runs" / "nb" / "rome" / "report" / "index.html").is_file()
    metrics = namespace["metrics"]
    assert isinstance(metrics, list) and len(metrics) == 10
    assert {"rewrite_acc", "rephrase_acc", "locality", "seqedit"} <= set(metrics[0]["post"])
