"""`seqedit.Campaign`: a campaign from Python, for notebooks and scripts.

    campaign = seqedit.Campaign.from_yaml("examples/demo.yaml", out="runs/nb")
    campaign.run()                                   # embedded Ray, a progress bar
    campaign.query("SELECT * FROM curves").to_pandas()
    campaign.plot(); campaign.report()

Everything goes through the same functions as the `seqedit` commands; the campaign
directory is the same, so the CLI reads what Python wrote and the other way round.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import pyarrow as pa
import yaml

from seqedit.pipeline.cli.commands import progress_bar  # tqdm.auto: a widget in a notebook
from seqedit.schemas.campaign import CampaignSpec, load_spec
from seqedit.storage import Location, Where, location


class Campaign:
    """A campaign spec and the directory its results go to.

    Args:
        spec: the validated spec (paths in it resolved).
        out: the campaign directory, a path or a storage URI.
        spec_file: the YAML it came from (needed by `submit`; written for you by
            `from_kwargs`).
    """

    def __init__(self, spec: CampaignSpec, out: Where, spec_file: Path | None = None) -> None:
        self.spec, self.out, self.spec_file = spec, location(out), spec_file

    @classmethod
    def from_yaml(cls, path: str | Path, out: Where) -> Campaign:
        """The campaign of a YAML spec (paths in it are relative to the file)."""
        return cls(load_spec(path), out, Path(path))

    @classmethod
    def from_kwargs(cls, out: Where, **fields: Any) -> Campaign:
        """A campaign from spec fields given as keyword arguments (the YAML's keys; paths
        relative to the working directory). The spec is written to `<out>.spec.yaml`
        beside a local `out` (to a temporary file otherwise) so `submit` can send it."""
        where = location(out)
        text = yaml.safe_dump(fields, sort_keys=False)
        if where.is_local:
            spec_file = where.local_path.with_name(where.local_path.name + ".spec.yaml")
            spec_file.parent.mkdir(parents=True, exist_ok=True)
        else:
            spec_file = Path(tempfile.mkdtemp()) / "spec.yaml"
        spec_file.write_text(text)
        spec = CampaignSpec.model_validate(fields).resolved(Path.cwd())
        return cls(spec, out, spec_file)

    def run(self, *, progress: bool = True) -> Any:
        """Run (or resume) it here on an embedded Ray instance; returns the campaign state."""
        from seqedit.pipeline.run.driver import run_campaign

        with progress_bar(self.spec.n_edits, self.spec.name, progress) as update:
            return run_campaign(self.spec, self.out, progress=update)

    def submit(self, address: str) -> Any:
        """Submit it as a job to the Ray cluster at `address` (a job server, e.g.
        http://HEAD:8265); returns the submitted job (its id, address and command)."""
        from seqedit.pipeline.run.submit import submit_campaign

        if self.spec_file is None:
            raise ValueError("this campaign has no spec file to submit; use from_yaml")
        return submit_campaign(self.spec_file, self.out, address)

    def status(self) -> pa.Table:
        """One row per shard: its range, status, attempt, progress and error."""
        from seqedit.pipeline.cli.campaign_ops import status_table

        _, table, _ = status_table(self.out)
        return table

    def query(self, sql: str, **others: Where) -> pa.Table:
        """Read-only DuckDB SQL over the campaign's views (`others`: more campaigns, each
        as a schema of that name); an Arrow table (`.to_pandas()` where pandas is installed)."""
        from seqedit.pipeline.results.views import query

        return query(self.out, sql, others or None)

    def curves(self) -> pa.Table:
        """The degradation curve: ES/PS/NS and health by edits applied."""
        return self.query("SELECT * FROM curves ORDER BY n_edits_applied")

    def plot(self, out: Where | None = None) -> list[Location]:
        """The campaign's PNGs (degradation, health, norm growth); their locations."""
        from seqedit.pipeline.cli.commands import plot_campaign

        return plot_campaign(self.out, out)

    def report(self, out: Where | None = None, compare: tuple[Where, ...] = ()) -> Location:
        """The HTML report (default `<campaign>/report/index.html`); its location."""
        from seqedit.pipeline.results.report import write_report

        return write_report(self.out, out=out, compare=compare)
