"""The metric lake: immutable Parquet parts per table/shard/attempt, read through DuckDB.

Layout: `<campaign>/tables/<table>/shard=<k>/attempt=<a>/part-<n>.parquet`. Parts are
written atomically and never modified. Views expose only the attempt of each shard that
the campaign state marks done, so a rerun never duplicates or loses rows.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel

from seqedit.files import write_atomic
from seqedit.pipeline.state import CampaignState, ShardState
from seqedit.schemas.tables import TABLES, arrow_schema
from seqedit.workers.health import DRIFT_PREFIX, PERIODIC_CHECKS

READ_ONLY_STATEMENTS = {"SELECT", "EXPLAIN"}


class QueryError(ValueError):
    """A query that may not run (it would modify the lake) or that failed."""


def partition_dir(campaign_dir: str | Path, table: str, shard: int, attempt: int) -> Path:
    """Folder of one table's parts for one shard attempt."""
    return Path(campaign_dir) / "tables" / table / f"shard={shard}" / f"attempt={attempt}"


def write_part(
    campaign_dir: str | Path,
    table: str,
    shard: int,
    attempt: int,
    part: int,
    rows: Sequence[BaseModel],
) -> Path:
    """Write `rows` (of the table's row model) as one immutable Parquet part, atomically."""
    row_model = TABLES[table]
    for row in rows:
        if not isinstance(row, row_model):
            raise TypeError(f"table {table!r} takes {row_model.__name__}, got {type(row).__name__}")
    data = pa.Table.from_pylist([r.model_dump() for r in rows], schema=arrow_schema(row_model))
    target = partition_dir(campaign_dir, table, shard, attempt) / f"part-{part:05d}.parquet"
    return write_atomic(target, lambda tmp: pq.write_table(data, tmp))


def clear_attempt(campaign_dir: str | Path, shard: int, attempt: int) -> None:
    """Remove the parts of an attempt that did not finish (they are never visible anyway)."""
    for table in TABLES:
        folder = partition_dir(campaign_dir, table, shard, attempt)
        if folder.is_dir():
            for file in folder.iterdir():
                file.unlink()


def connect(campaign_dir: str | Path) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB with one view per table, sandboxed to the campaign's tables,
    plus `shards` (the campaign state, one row per shard), `curves` (`CURVES_SQL`) and
    `periodic` (`PERIODIC_SQL`).

    File access outside `<campaign>/tables` is disabled and the configuration is locked, so
    a query can read the lake but cannot read or write anything else.
    """
    root = Path(campaign_dir).resolve()
    state = CampaignState.load(root)
    con = duckdb.connect()
    tables_dir = root / "tables"
    con.execute("SET allowed_directories = ?", [[str(tables_dir) + "/"]])
    con.execute("SET enable_external_access = false")
    for table, row_model in TABLES.items():
        files = [
            str(f)
            for shard, attempt in state.done_partitions()
            for f in sorted(partition_dir(root, table, shard, attempt).glob("part-*.parquet"))
        ]
        if files:
            listed = ", ".join("'" + f.replace("'", "''") + "'" for f in files)
            con.execute(
                f"CREATE VIEW {table} AS SELECT * FROM read_parquet([{listed}], "
                "hive_partitioning = true, union_by_name = true)"
            )
        else:
            schema = arrow_schema(row_model)
            schema = schema.append(pa.field("shard", pa.int64())).append(
                pa.field("attempt", pa.int64())
            )
            con.register(f"_empty_{table}", schema.empty_table())
            con.execute(f"CREATE VIEW {table} AS SELECT * FROM _empty_{table}")
    shards = pa.Table.from_pylist(
        [s.model_dump() for s in state.shards], schema=arrow_schema(ShardState)
    )
    con.register("_shards", shards)
    con.execute("CREATE VIEW shards AS SELECT * FROM _shards")
    con.execute(CURVES_SQL)
    con.execute(PERIODIC_SQL)
    con.execute("SET lock_configuration = true")
    return con


_PIVOT = "".join(
    f"max(value) FILTER (WHERE check_name = '{name}') AS {name}, " for name in PERIODIC_CHECKS
)
PERIODIC_SQL = f"""
CREATE VIEW periodic AS
SELECT step, {_PIVOT}
       max(value) FILTER (WHERE check_name LIKE '{DRIFT_PREFIX}%') AS weight_drift,
       sum(seconds) AS seconds
FROM health
WHERE check_name IN ({", ".join(f"'{n}'" for n in PERIODIC_CHECKS)})
   OR check_name LIKE '{DRIFT_PREFIX}%'
GROUP BY step
"""
"""The periodic health checks, one row per check point: each check a column, the largest
layer drift as `weight_drift`, and the seconds they took."""

CURVES_SQL = """
CREATE VIEW curves AS
SELECT protocol, n_edits_applied, count(*) AS records,
       avg(es) AS es, avg(ps) AS ps, avg(ns) AS ns,
       CASE WHEN avg(es) IS NULL OR avg(ps) IS NULL OR avg(ns) IS NULL THEN NULL
            WHEN least(avg(es), avg(ps), avg(ns)) > 0
            THEN 3 / (1 / avg(es) + 1 / avg(ps) + 1 / avg(ns)) ELSE 0 END AS score,
       avg(em) AS em, avg(pm) AS pm, avg(nm) AS nm, avg(rewrite_acc) AS rewrite_acc
FROM evals
GROUP BY protocol, n_edits_applied
"""
"""Campaign metrics at each evaluation point: means over the records scored there, and
the score (harmonic mean of ES, PS, NS; 0 when one is 0, NULL when one is missing), as
`methods.metrics.score` defines it."""


def check_read_only(sql: str) -> None:
    """Refuse any statement that is not a query (DELETE, COPY, ATTACH, SET, CREATE ...)."""
    try:
        statements = duckdb.extract_statements(sql)
    except duckdb.Error as exc:
        raise QueryError(f"cannot parse query: {exc}") from exc
    if not statements:
        raise QueryError("empty query")
    for statement in statements:
        kind = statement.type.name
        if kind not in READ_ONLY_STATEMENTS:
            raise QueryError(
                f"{kind} statements are not allowed: `seqedit query` opens the campaign "
                "read-only (use SELECT, WITH ... SELECT, DESCRIBE, SUMMARIZE or EXPLAIN)"
            )


def query(campaign_dir: str | Path, sql: str) -> pa.Table:
    """Run a read-only SQL query over the campaign's views; the result as an Arrow table."""
    check_read_only(sql)
    con = connect(campaign_dir)
    try:
        return con.sql(sql).to_arrow_table()
    except duckdb.Error as exc:
        raise QueryError(f"query failed: {exc}") from exc
    finally:
        con.close()
