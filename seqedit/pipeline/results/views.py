"""DuckDB views over a campaign's metric lake, and read-only SQL on them.

Views expose only the attempt of each shard that the campaign state marks done, so a rerun
never duplicates or loses rows (the parts themselves: `campaign_dir.parts`).
`connect(..., others=...)` adds other campaigns' views, each in its own schema.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from functools import cache

import duckdb
import pyarrow as pa
import pyarrow.dataset as ds

from seqedit.errors import SeqeditError
from seqedit.pipeline.campaign_dir.parts import list_parts
from seqedit.pipeline.campaign_dir.state import CampaignState, ShardState
from seqedit.pipeline.results.train_views import create_train_views, is_training_dir
from seqedit.schemas.tables import TABLES, arrow_schema
from seqedit.storage import Location, Where, location
from seqedit.workers.health import DRIFT_PREFIX, PERIODIC_CHECKS

READ_ONLY_STATEMENTS = {"SELECT", "EXPLAIN"}


class QueryError(SeqeditError, ValueError):
    """A query that may not run (it would modify the lake) or that failed."""


VIEWS = (*TABLES, "shards", "curves", "periodic")
"""Every view a campaign gets, in its own schema or (the main campaign) unqualified."""

_OTHER_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_TAKEN_SCHEMAS = {"main", "temp", "memory", "system", "information_schema", "pg_catalog"}


@cache
def _reserved_words() -> frozenset[str]:
    with duckdb.connect() as con:
        rows = con.sql(
            "SELECT keyword_name FROM duckdb_keywords() WHERE keyword_category = 'reserved'"
        ).fetchall()
    return frozenset(row[0] for row in rows)


def check_other_name(name: str) -> None:
    """Refuse a schema name for another campaign that SQL could not use plainly as `name.view`:
    not an identifier, a view name, a DuckDB catalog/schema name or a reserved word."""
    if not _OTHER_NAME.fullmatch(name):
        raise QueryError(
            f"campaign name {name!r}: use letters, digits and _ (not first a digit), e.g. b"
        )
    lower = name.lower()
    if lower in VIEWS:
        raise QueryError(f"campaign name {name!r} is a view name; pick another, e.g. b")
    if lower in _TAKEN_SCHEMAS or lower in _reserved_words():
        raise QueryError(f"campaign name {name!r} is reserved in DuckDB; pick another, e.g. b")


def _resolve_others(others: Mapping[str, Where] | None) -> dict[str, Location]:
    """Validated names of the other campaigns and their locations."""
    resolved: dict[str, Location] = {}
    for name, folder in (others or {}).items():
        check_other_name(name)
        if name.lower() in {n.lower() for n in resolved}:
            raise QueryError(f"campaign name {name!r} is given twice")
        where = location(folder)
        if not where.is_dir():
            raise FileNotFoundError(f"campaign {name!r}: {where}: no such directory")
        resolved[name] = where
    return resolved


def connect(
    campaign_dir: Where, others: Mapping[str, Where] | None = None
) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB with one view per table, sandboxed to the campaign's tables,
    plus `shards` (the campaign state, one row per shard), `curves` (`CURVES_SQL`) and
    `periodic` (`PERIODIC_SQL`). A training directory (`seqedit train`) gets its `train`
    and `train_curves` views instead (`train_views`).

    `others` maps a name to another campaign dir: that campaign gets the same views inside
    a schema of that name (`b.curves`, `b.evals`, ...), so one statement can compare
    campaigns; the main campaign's views stay unqualified.

    The parts are read through pyarrow (`seqedit.storage`), so a campaign on S3 queries
    like a local one. DuckDB itself gets no file access at all and its configuration is
    locked: a query can read the lakes but cannot read or write anything else.
    """
    root = location(campaign_dir)
    if is_training_dir(root):  # `seqedit train`'s output: its `train` table
        if others:
            raise QueryError(f"{root}: a training directory is queried alone (no --with)")
        con = duckdb.connect()
        con.execute("SET enable_external_access = false")
        create_train_views(con, root)
        con.execute("SET lock_configuration = true")
        return con
    attached = _resolve_others(others)
    state = CampaignState.load(root)
    states: dict[str, CampaignState] = {}
    for name, folder in attached.items():
        try:
            states[name] = CampaignState.load(folder)
        except FileNotFoundError as exc:
            raise FileNotFoundError(f"campaign {name!r}: {exc}") from exc
        except ValueError as exc:
            raise QueryError(f"campaign {name!r}: {exc}") from exc
    con = duckdb.connect()
    con.execute("SET enable_external_access = false")
    _create_views(con, root, state, schema=None, tag="")
    for number, (name, folder) in enumerate(attached.items()):
        con.execute(f'CREATE SCHEMA "{name}"')
        _create_views(con, folder, states[name], schema=name, tag=f"_o{number}")
    con.execute("SET lock_configuration = true")
    return con


def _create_views(
    con: duckdb.DuckDBPyConnection,
    root: Location,
    state: CampaignState,
    schema: str | None,
    tag: str,
) -> None:
    """Create every view of one campaign, in `schema` (None: unqualified); `tag` keeps the
    names of its registered Arrow tables apart from other campaigns'."""
    prefix = f'"{schema}".' if schema else ""
    for table, row_model in TABLES.items():
        files = [
            part
            for shard, attempt in state.done_partitions()
            for part in list_parts(root, table, shard, attempt)
        ]
        keys = pa.schema([pa.field("shard", pa.int64()), pa.field("attempt", pa.int64())])
        arrow = pa.unify_schemas([arrow_schema(row_model), keys])
        # every column of today's schema, NULL in parts written before it had that column
        parts = ds.dataset(
            [part.fs_path for part in files],
            schema=arrow,
            format="parquet",
            filesystem=root.fs,
            partitioning=ds.partitioning(keys, flavor="hive"),
            partition_base_dir=(root / "tables" / table).fs_path,
        )
        name = f"{tag}_parts_{table}"
        con.register(name, parts)
        con.execute(f"CREATE VIEW {prefix}{table} AS SELECT * FROM {name}")
    shards = pa.Table.from_pylist(
        [s.model_dump() for s in state.shards], schema=arrow_schema(ShardState)
    )
    con.register(f"{tag}_shards", shards)
    con.execute(f"CREATE VIEW {prefix}shards AS SELECT * FROM {tag}_shards")
    con.execute(_curves_sql(prefix))
    con.execute(_periodic_sql(prefix))


_PIVOT = "".join(
    f"max(value) FILTER (WHERE check_name = '{name}') AS {name}, " for name in PERIODIC_CHECKS
)


def _periodic_sql(prefix: str) -> str:
    """The statement creating `periodic` over the `health` view, both behind `prefix`."""
    names = ", ".join(f"'{n}'" for n in PERIODIC_CHECKS)
    return f"""
CREATE VIEW {prefix}periodic AS
SELECT step, {_PIVOT}
       max(value) FILTER (WHERE check_name LIKE '{DRIFT_PREFIX}%') AS weight_drift,
       sum(seconds) AS seconds
FROM {prefix}health
WHERE check_name IN ({names})
   OR check_name LIKE '{DRIFT_PREFIX}%'
GROUP BY step
"""


PERIODIC_SQL = _periodic_sql("")
"""The periodic health checks, one row per check point: each check a column, the largest
layer drift as `weight_drift`, and the seconds they took."""


IMMEDIATE_BUCKETS = 20
"""Immediate rows (one edit count each) are averaged over this many equal buckets."""


def _curves_sql(prefix: str) -> str:
    """The statement creating `curves` over `evals` and `model_evals`, behind `prefix`."""
    return f"""
CREATE VIEW {prefix}curves AS
WITH width AS (
    SELECT greatest(1, ceil(max(n_edits_applied) / {IMMEDIATE_BUCKETS}))::BIGINT AS w
    FROM {prefix}evals WHERE protocol = 'immediate'
), bucketed AS (
    SELECT e.*, CASE WHEN protocol = 'immediate'
                     THEN least(ceil(n_edits_applied / w)::BIGINT * w,
                                max(n_edits_applied) OVER ())
                     ELSE n_edits_applied END AS point
    FROM {prefix}evals e, width
), metrics AS (
    SELECT protocol, point AS n_edits_applied, count(*) AS records,
           avg(es) AS es, avg(ps) AS ps, avg(ns) AS ns,
           CASE WHEN avg(es) IS NULL OR avg(ps) IS NULL OR avg(ns) IS NULL THEN NULL
                WHEN least(avg(es), avg(ps), avg(ns)) > 0
                THEN 3 / (1 / avg(es) + 1 / avg(ps) + 1 / avg(ns)) ELSE 0 END AS score,
           avg(em) AS em, avg(pm) AS pm, avg(nm) AS nm, avg(rewrite_acc) AS rewrite_acc,
           avg(rephrase_acc) AS rephrase_acc, avg(locality_acc) AS locality_acc,
           avg(locality_agreement) AS locality_agreement,
           avg(portability_acc) AS portability_acc, avg(fluency) AS fluency
    FROM bucketed
    GROUP BY protocol, point
)
SELECT m.*, p.value AS perplexity
FROM metrics m
LEFT JOIN (SELECT protocol, n_edits_applied, any_value(value) AS value
           FROM {prefix}model_evals WHERE metric = 'perplexity'
           GROUP BY protocol, n_edits_applied) p
USING (protocol, n_edits_applied)
"""


CURVES_SQL = _curves_sql("")
"""Campaign metrics at each evaluation point: means over the records scored there, the
score (harmonic mean of ES, PS, NS; 0 when one is 0, NULL when one is missing), as
`methods.metrics.score` defines it, and the held-out perplexity measured there. Immediate
rows are bucketed (`IMMEDIATE_BUCKETS` equal spans of edits; `n_edits_applied` is a
bucket's last edit count)."""


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


def query(campaign_dir: Where, sql: str, others: Mapping[str, Where] | None = None) -> pa.Table:
    """Run a read-only SQL query over the campaign's views (and those of `others`, each in
    its own schema, as `connect` makes them); the result as an Arrow table."""
    check_read_only(sql)
    con = connect(campaign_dir, others)
    try:
        return con.sql(sql).to_arrow_table()
    except duckdb.Error as exc:
        raise QueryError(f"query failed: {exc}") from exc
    finally:
        con.close()
