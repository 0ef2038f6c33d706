"""Query time of the metric lake: our views (parts read through pyarrow datasets, so that
campaigns on S3 query like local ones) against DuckDB's own Parquet reader on the same
files (how the views read local parts before storage URIs).

    .venv/bin/python bench/lake_query.py [--campaign runs/bench-scale/scale-rome-10000-record]
        [--repeats 5] [--s3]

Each query of the cookbook kind runs on a fresh connection (`views.connect`, as
`seqedit query` does) and on a baseline connection whose views are `read_parquet` over
the same done parts; the answers must be equal (floats within 1e-9 relative). With
`--s3` the campaign is also copied to a local S3 server (moto) and queried there, for
the cost of going through S3 at all.
Median of `--repeats` timings. A 10,000-edit campaign comes from `bench/campaign_scale.py`.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import duckdb
import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from seqedit.pipeline.campaign_dir.parts import list_parts
from seqedit.pipeline.campaign_dir.state import CampaignState
from seqedit.pipeline.results import views
from seqedit.pipeline.results.tables_format import format_table
from seqedit.schemas.tables import TABLES, arrow_schema
from seqedit.storage import location

QUERIES = {
    "count edits": "SELECT count(*) FROM edits",
    "curves": "SELECT * FROM curves ORDER BY protocol, n_edits_applied",
    "forgotten per relation": (
        "SELECT relation_id, avg(es) AS es FROM evals WHERE protocol = 'final' "
        "GROUP BY relation_id ORDER BY es, relation_id LIMIT 5"
    ),
    "health failures": (
        "SELECT check_name, count(*) FROM health WHERE NOT passed GROUP BY 1 ORDER BY 1"
    ),
}


def baseline_connection(root: Path) -> duckdb.DuckDBPyConnection:
    """Views over DuckDB's `read_parquet` of the done parts, then `curves` as ours."""
    state = CampaignState.load(root)
    con = duckdb.connect()
    for table, row_model in TABLES.items():
        files = [
            str(part.local_path)
            for shard, attempt in state.done_partitions()
            for part in list_parts(root, table, shard, attempt)
        ]
        keys = pa.schema([pa.field("shard", pa.int64()), pa.field("attempt", pa.int64())])
        con.register(f"_empty_{table}", pa.unify_schemas([arrow_schema(row_model), keys])
                     .empty_table())  # fmt: skip
        listed = ", ".join(f"'{f}'" for f in files)
        source = (
            f"SELECT * FROM _empty_{table} UNION ALL BY NAME SELECT * FROM read_parquet("
            f"[{listed}], hive_partitioning = true, union_by_name = true)"
            if files
            else f"SELECT * FROM _empty_{table}"
        )
        con.execute(f"CREATE VIEW {table} AS {source}")
    con.execute(views.CURVES_SQL)
    return con


def same(a: pa.Table, b: pa.Table) -> bool:
    """Equal rows, floats within 1e-9 relative (DuckDB sums in its own order)."""
    rows_a, rows_b = a.to_pylist(), b.to_pylist()
    return len(rows_a) == len(rows_b) and all(
        x.keys() == y.keys()
        and all(
            math.isclose(x[k], y[k], rel_tol=1e-9) if isinstance(x[k], float) else x[k] == y[k]
            for k in x
        )
        for x, y in zip(rows_a, rows_b, strict=True)
    )


def timed(run: Callable[[], pa.Table], repeats: int) -> tuple[float, pa.Table]:
    times, result = [], pa.table({})
    for _ in range(repeats):
        started = time.perf_counter()
        result = run()
        times.append(time.perf_counter() - started)
    return statistics.median(times), result


def upload(root: Path, target: str) -> None:
    for file in root.rglob("*"):
        if file.is_file() and "report" not in file.parts:
            (location(target) / str(file.relative_to(root))).write_bytes(file.read_bytes())


def s3_campaign(root: Path) -> tuple[str, Callable[[], None]]:
    from moto.server import ThreadedMotoServer

    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        os.environ.setdefault(name, "bench")
    os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    uri = (f"s3://bench/c?endpoint_override={host}:{port}&scheme=http&region=us-east-1"
           "&allow_bucket_creation=true")  # fmt: skip
    location(uri).parent.mkdir()
    upload(root, uri)
    return uri, server.stop


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--campaign", type=Path,
                        default=Path("runs/bench-scale/scale-rome-10000-record"))  # fmt: skip
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--s3", action="store_true")
    args = parser.parse_args()
    root = args.campaign.resolve()
    if not (root / "state.json").is_file():
        sys.exit(f"{root}: no campaign here; run bench/campaign_scale.py first")
    parts = sum(1 for _ in root.rglob("part-*.parquet"))
    print(f"campaign {root} ({parts} parts), median of {args.repeats}")
    s3 = s3_campaign(root) if args.s3 else None
    rows = []
    for name, sql in QUERIES.items():
        ours_s, ours = timed(lambda sql=sql: views.query(root, sql), args.repeats)

        def base(sql: str = sql) -> pa.Table:
            con = baseline_connection(root)
            try:
                return con.sql(sql).to_arrow_table()
            finally:
                con.close()

        base_s, expected = timed(base, args.repeats)
        if not same(ours, expected):
            sys.exit(f"{name}: our views and read_parquet disagree")
        row = {"query": name, "read_parquet_ms": round(base_s * 1e3, 1),
               "ours_ms": round(ours_s * 1e3, 1), "ours_vs_baseline": round(ours_s / base_s, 2)}
        if s3 is not None:
            remote_s, remote = timed(lambda sql=sql: views.query(s3[0], sql), args.repeats)
            if not same(remote, expected):
                sys.exit(f"{name}: the campaign on S3 answers differently")
            row |= {"s3_ms": round(remote_s * 1e3, 1)}
        rows.append(row)
    if s3 is not None:
        s3[1]()
    print(format_table(pa.Table.from_pylist(rows), "table"))


if __name__ == "__main__":
    main()
