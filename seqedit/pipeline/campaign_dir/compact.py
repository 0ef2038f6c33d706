"""Compaction of the metric lake: the parts of each done partition merged into one part.

A shard attempt may write many small parts (one per evaluation point); `compact` merges the
parts of every done partition (`CampaignState.done_partitions`) of every table into one,
rows in the order readers take the parts in (`parts.list_parts`), so every query answers
as before. Partitions with 0 or 1 part, and attempts that are not done, are left alone.

How a partition `tables/<table>/shard=<k>/attempt=<a>` is merged, and why no reader and no
crash can ever see duplicated or missing rows:

1. The merged part is written beside it, in the sidecar `shard=<k>/.compact-attempt=<a>/`
   (temp file + fsync + rename, then the sidecar folder is fsynced). No reader looks there:
   readers list only `attempt=<a>/part-*.parquet` of done attempts.
2. One `renameat2(RENAME_EXCHANGE)` swaps the two folders. It is a single atomic step: a
   reader listing `attempt=<a>` finds either every original part or the merged one, never
   both, never neither (two plain renames would leave a moment with no folder at all).
   The shard folder is fsynced, so the swap survives a power loss.
3. The sidecar, now holding the originals (and any `.tmp-*` a crashed writer left beside
   them), is deleted.

A crash (or an error) anywhere leaves at most a sidecar behind, and whatever a sidecar
holds is never the live copy of anything: before the swap it is an unfinished or unused
merge of parts that are still live, after it the originals of a merged part that is live.
So `compact` first deletes every sidecar it finds (they are reported as leftovers), then
merges whatever still has several parts. State (`state.json`) is never written.

The merged part takes a number no original had (one more than the last), so a reader that
listed the originals before the swap and reads after it fails on a missing file; it never
mixes merged and original rows. Rerunning the query answers correctly.

`compact` holds the campaign's driver lock throughout, so it refuses to run while a driver
runs the campaign (and a driver refuses to start while it compacts). The swap needs Linux
`renameat2` on a filesystem with RENAME_EXCHANGE (ext4, xfs, btrfs, tmpfs, ...); where
that is missing compact refuses, with nothing changed.
"""

from __future__ import annotations

import ctypes
import os
import re
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict

from seqedit.errors import SeqeditError
from seqedit.files import write_atomic
from seqedit.pipeline.campaign_dir import parts
from seqedit.pipeline.campaign_dir.lock import (
    LOCK_FILE,
    CampaignBusyError,
    driver_lock,
    lock_holder,
)
from seqedit.pipeline.campaign_dir.state import CampaignState
from seqedit.schemas.tables import TABLES
from seqedit.storage import Where, location

SIDECAR_PREFIX = ".compact-"
"""Prefix of the folder beside `attempt=<a>` where its merged part is built."""
_PART_NUMBER = re.compile(r"part-(\d+)\.parquet")
_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


class CompactError(SeqeditError, RuntimeError):
    """A partition that could not be compacted (nothing visible to readers has changed)."""


class TableCompaction(BaseModel):
    """Parts and bytes of one table's done partitions before and after compaction."""

    model_config = ConfigDict(extra="forbid")

    table: str
    partitions_compacted: int
    parts_before: int
    parts_after: int
    bytes_before: int
    bytes_after: int


class CompactReport(BaseModel):
    """What `compact` did to a campaign's lake."""

    model_config = ConfigDict(extra="forbid")

    campaign_dir: str
    tables: list[TableCompaction]
    leftovers_removed: list[str]
    """Sidecars of an interrupted compact that this run deleted (relative to `tables/`)."""

    @property
    def partitions_compacted(self) -> int:
        """Partitions merged by this run, over all tables."""
        return sum(t.partitions_compacted for t in self.tables)


def compact(campaign_dir: Where) -> CompactReport:
    """Merge the parts of every done partition of every table into one part, atomically,
    under the campaign's driver lock (refused while a driver runs). Local and shared paths
    only: an object store has no atomic exchange of folders."""
    where = location(campaign_dir)
    CampaignState.load(where)  # a clear error for a folder that is no campaign
    if not where.is_local:
        raise CompactError(
            f"{where}: compact works on local and shared paths only (it swaps folders "
            "atomically, which an object store cannot); the parts there stay as written and "
            "every query reads them as they are"
        )
    root = where.local_path.resolve()
    try:
        with driver_lock(root):
            return _compact_locked(root)
    except CampaignBusyError:
        raise CampaignBusyError(
            f"{root}: {lock_holder(root)} holds {LOCK_FILE} (a driver running this campaign, or "
            "another compact); compact refuses to touch the lake until it finishes"
        ) from None


def _compact_locked(root: Path) -> CompactReport:
    state = CampaignState.load(root)  # read under the lock: no driver changes it now
    removed = remove_leftovers(root)
    done = state.done_partitions()
    tables = [_compact_table(root, table, done) for table in TABLES]
    return CompactReport(campaign_dir=str(root), tables=tables, leftovers_removed=removed)


def remove_leftovers(root: Path) -> list[str]:
    """Delete the sidecars an interrupted compact left (never live data; see the module
    docstring); their paths relative to `tables/`."""
    tables = root / "tables"
    removed = []
    for sidecar in sorted(tables.glob(f"*/shard=*/{SIDECAR_PREFIX}*")):
        _remove_sidecar(sidecar)
        removed.append(str(sidecar.relative_to(tables)))
    return removed


def _compact_table(root: Path, table: str, done: list[tuple[int, int]]) -> TableCompaction:
    parts_before = parts_after = bytes_before = bytes_after = merged = 0
    for shard, attempt in done:
        parts = list_parts(root, table, shard, attempt)
        parts_before += len(parts)
        bytes_before += sum(p.stat().st_size for p in parts)
        if len(parts) > 1:
            merge_partition(root, table, shard, attempt)
            merged += 1
            parts = list_parts(root, table, shard, attempt)
        parts_after += len(parts)
        bytes_after += sum(p.stat().st_size for p in parts)
    return TableCompaction(table=table, partitions_compacted=merged, parts_before=parts_before,
                           parts_after=parts_after, bytes_before=bytes_before,
                           bytes_after=bytes_after)  # fmt: skip


def list_parts(root: Path, table: str, shard: int, attempt: int) -> list[Path]:
    """`parts.list_parts` on a local campaign, as OS paths."""
    return [part.local_path for part in parts.list_parts(root, table, shard, attempt)]


def partition_dir(root: Path, table: str, shard: int, attempt: int) -> Path:
    """`parts.partition_dir` on a local campaign, as an OS path."""
    return parts.partition_dir(root, table, shard, attempt).local_path


def merge_partition(root: Path, table: str, shard: int, attempt: int) -> None:
    """Replace the parts of one partition by one part holding their rows in file order."""
    live = partition_dir(root, table, shard, attempt)
    parts = list_parts(root, table, shard, attempt)
    merged = _read_in_order(parts)
    numbers = [int(m.group(1)) for p in parts if (m := _PART_NUMBER.fullmatch(p.name))]
    sidecar = live.parent / f"{SIDECAR_PREFIX}{live.name}"
    sidecar.mkdir()  # remove_leftovers ran first: an existing one is a second compact
    target = sidecar / f"part-{max(numbers, default=-1) + 1:05d}.parquet"
    _write_merged(target, merged)
    written = pq.ParquetFile(target).metadata.num_rows
    if written != merged.num_rows:
        _remove_sidecar(sidecar)
        raise CompactError(f"{target}: wrote {written} rows of {merged.num_rows}; nothing changed")
    _fsync_dir(sidecar)
    try:
        _exchange(sidecar, live)
    except OSError as exc:
        _remove_sidecar(sidecar)
        raise CompactError(
            f"{live}: cannot swap in the merged part: this system cannot exchange two "
            f"folders atomically (renameat2 RENAME_EXCHANGE: {exc.strerror}); nothing changed"
        ) from exc
    _fsync_dir(live.parent)
    _remove_sidecar(sidecar)


def _read_in_order(parts: list[Path]) -> pa.Table:
    """The rows of `parts`, one part after another (columns a part lacks become nulls, as
    the views' `union_by_name` reads them)."""
    tables = [pq.ParquetFile(p).read() for p in parts]  # a file, not a hive dataset
    try:
        merged = pa.concat_tables(tables, promote_options="default")
    except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
        raise CompactError(
            f"{parts[0].parent}: its parts have clashing schemas, left as they are: {exc}"
        ) from exc
    # a column some part lacks is filled with nulls: it must be nullable to be written
    fields = [f.with_nullable(f.nullable or merged[f.name].null_count > 0) for f in merged.schema]
    return merged.cast(pa.schema(fields, metadata=merged.schema.metadata))


def _write_merged(target: Path, merged: pa.Table) -> None:
    """Write the merged part into the sidecar (atomic and fsynced, by `write_atomic`)."""
    write_atomic(target, lambda tmp: pq.write_table(merged, tmp))


def _exchange(a: Path, b: Path) -> None:
    """Swap two folders in one atomic step (Linux `renameat2` with RENAME_EXCHANGE)."""
    libc = ctypes.CDLL(None, use_errno=True)
    renameat2 = getattr(libc, "renameat2", None)
    if renameat2 is None:
        raise OSError(0, "the C library has no renameat2")
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p,
                          ctypes.c_uint]  # fmt: skip
    renameat2.restype = ctypes.c_int
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, os.strerror(errno), str(a), None, str(b))


def _remove_sidecar(sidecar: Path) -> None:
    """Delete a sidecar folder and make its removal durable."""
    shutil.rmtree(sidecar)
    _fsync_dir(sidecar.parent)


def _fsync_dir(folder: Path) -> None:
    """Make the entries of `folder` (created, renamed, removed files) durable."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
