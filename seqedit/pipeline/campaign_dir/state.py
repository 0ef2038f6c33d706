"""Durable campaign state: which shards exist, which attempt of each is done.

The state file is rewritten atomically after every transition, so another process
(`seqedit query`, `seqedit status`) can read it while the campaign runs.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from seqedit.errors import SeqeditError
from seqedit.storage import Where, location

ShardStatus = Literal["pending", "running", "done", "failed", "stopped"]
"""stopped: a health check with policy `stop` ended the shard; its rows up to then count."""
CampaignStatus = Literal["pending", "running", "done", "failed", "stopped"]
"""pending: not started, or some shards still to run (e.g. after `rerun --shard`)."""
STATE_FILE = "state.json"


class StateFileError(SeqeditError, ValueError):
    """A campaign state file that cannot be read, naming it."""


def now() -> str:
    """UTC timestamp, ISO 8601."""
    return datetime.now(UTC).isoformat(timespec="seconds")


class ShardState(BaseModel):
    """One contiguous range of edit steps [start, stop) and its latest attempt."""

    model_config = ConfigDict(extra="forbid")

    index: int
    start: int
    stop: int
    status: ShardStatus = "pending"
    attempt: int = Field(default=0, description="Number of the latest attempt (0-based).")
    done_attempt: int | None = Field(default=None, description="Attempt whose rows count.")
    steps_done: int = Field(default=0, ge=0, description="Steps of the latest attempt done.")
    worker_pid: int | None = Field(default=None, description="Process of the latest attempt.")
    error: str | None = None
    started_at: str | None = None
    finished_at: str | None = None
    weights_fingerprint: str | None = Field(
        default=None,
        description="sha256 of the edited weights when the shard was done: replaying the edit "
        "log of shards 0..k from the base model must reproduce it.",
    )


class CampaignState(BaseModel):
    """All shards of a campaign plus the hash of the spec they were planned from."""

    model_config = ConfigDict(extra="forbid")

    campaign: str
    spec_hash: str
    shards: list[ShardState]
    status: CampaignStatus = "pending"
    updated_at: str = Field(default_factory=now)

    def save(self, campaign_dir: Where) -> None:
        """Atomically write the state file."""
        self.updated_at = now()
        (location(campaign_dir) / STATE_FILE).write_text(self.model_dump_json(indent=2))

    @classmethod
    def load(cls, campaign_dir: Where) -> CampaignState:
        """Read the state file, naming it in any error."""
        path = location(campaign_dir) / STATE_FILE
        try:
            text = path.read_text()
        except FileNotFoundError:
            raise FileNotFoundError(
                f"{path}: no campaign state here (is this a campaign dir?)"
            ) from None
        try:
            return cls.model_validate_json(text)
        except ValidationError as exc:
            raise StateFileError(f"{path}: corrupt campaign state: {exc}") from exc

    def done_partitions(self) -> list[tuple[int, int]]:
        """(shard, attempt) of every finished shard: the only rows queries may see."""
        return [
            (s.index, s.done_attempt)
            for s in self.shards
            if s.status in ("done", "stopped") and s.done_attempt is not None
        ]
