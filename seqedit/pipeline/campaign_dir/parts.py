"""The metric lake: immutable Parquet parts per table/shard/attempt, read through DuckDB.

Layout: `<campaign>/tables/<table>/shard=<k>/attempt=<a>/part-<n>.parquet`, on a local
path or any storage URI (`seqedit.storage`). Parts are written atomically and never
modified (`seqedit compact` replaces the parts of a done
partition by one merged part, atomically: `pipeline.compact`). The views over them
(`results.views`) expose only the attempt of each shard that the campaign state marks done.
"""

from __future__ import annotations

from collections.abc import Sequence

import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel

from seqedit.schemas.tables import TABLES, arrow_schema
from seqedit.storage import Location, Where, location


def partition_dir(campaign_dir: Where, table: str, shard: int, attempt: int) -> Location:
    """Folder of one table's parts for one shard attempt."""
    return location(campaign_dir) / "tables" / table / f"shard={shard}" / f"attempt={attempt}"


def write_part(
    campaign_dir: Where,
    table: str,
    shard: int,
    attempt: int,
    part: int,
    rows: Sequence[BaseModel],
) -> Location:
    """Write `rows` (of the table's row model) as one immutable Parquet part, atomically."""
    row_model = TABLES[table]
    for row in rows:
        if not isinstance(row, row_model):
            raise TypeError(f"table {table!r} takes {row_model.__name__}, got {type(row).__name__}")
    data = pa.Table.from_pylist([r.model_dump() for r in rows], schema=arrow_schema(row_model))
    target = partition_dir(campaign_dir, table, shard, attempt) / f"part-{part:05d}.parquet"
    return target.write_with(lambda tmp: pq.write_table(data, tmp))


def read_part(part: Location) -> pa.Table:
    """One part's rows (a single file, not a hive dataset: no partition columns)."""
    with part.fs.open_input_file(part.fs_path) as handle:
        return pq.ParquetFile(handle).read()


def clear_attempt(campaign_dir: Where, shard: int, attempt: int) -> None:
    """Remove the parts of an attempt that did not finish (they are never visible anyway)."""
    for table in TABLES:
        for file in partition_dir(campaign_dir, table, shard, attempt).iterdir():
            file.unlink(missing_ok=True)


def list_parts(campaign_dir: Where, table: str, shard: int, attempt: int) -> list[Location]:
    """The parts of one partition in file order, the order every reader takes them in."""
    return partition_dir(campaign_dir, table, shard, attempt).glob("part-*.parquet")
