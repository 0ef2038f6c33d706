"""docs/guide.md: its local commands run, in order, and it documents every spec field."""

from __future__ import annotations

import re
import shlex
import typing
from collections.abc import Iterator
from pathlib import Path

import pytest
import ray
from pydantic import BaseModel

from seqedit.pipeline.cli.main import main
from seqedit.schemas.campaign import CampaignSpec

GUIDE = Path(__file__).resolve().parents[1] / "docs" / "guide.md"
BLOCKS = re.findall(r"```(bash|yaml)\n(.*?)```", GUIDE.read_text(encoding="utf-8"), re.DOTALL)


def spec_fields(model: type[BaseModel], prefix: str = "") -> Iterator[str]:
    """Dotted names of every field of `model`, nested models included."""
    for name, field in model.model_fields.items():
        yield prefix + name
        for kind in (field.annotation, *typing.get_args(field.annotation)):
            if isinstance(kind, type) and issubclass(kind, BaseModel):
                yield from spec_fields(kind, f"{prefix}{name}.")


def test_the_reference_names_every_campaign_field() -> None:
    text = GUIDE.read_text(encoding="utf-8")
    missing = [f for f in spec_fields(CampaignSpec) if f"`{f}`" not in text]
    assert not missing, f"docs/guide.md does not document {missing}"


@pytest.mark.slow
def test_every_local_command_of_the_guide_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    ran = []
    try:
        for kind, body in BLOCKS:
            if kind == "yaml":  # a file the commands use, named on its first line
                first, _, rest = body.partition("\n")
                target = Path(first.removeprefix("# file: ").strip())
                assert first.startswith("# file: "), f"a yaml block without '# file:': {first}"
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_text(rest, encoding="utf-8")
                continue
            for line in body.strip().splitlines():
                argv = shlex.split(line)
                assert argv[0] == "seqedit", f"the guide's bash blocks run seqedit only: {line}"
                code = main(argv[1:])
                assert code in (0, None), f"`{line}` exited {code}: {capsys.readouterr().err}"
                ran.append(argv[1])
    finally:
        ray.shutdown()  # the runs started an embedded Ray in this process
    out = capsys.readouterr().out
    assert "campaign guide-rome: done" in out
    assert {"testbed", "stats", "validate", "run", "status", "query", "report", "rerun",
            "rebuild", "compact", "submit"} <= set(ran)  # fmt: skip
    assert (tmp_path / "runs/guide/campaign/report/index.html").is_file()
    assert (tmp_path / "runs/guide/model-after-10-edits/config.json").is_file()
