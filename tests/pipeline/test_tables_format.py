"""Terminal rendering of query results."""

from __future__ import annotations

import json

import pyarrow as pa

from seqedit.pipeline.results.tables_format import format_table

TABLE = pa.table({"n": [1, 20], "es": [0.5, None], "name": ["a", "bb"]})


def test_table_format_aligns_and_counts_rows() -> None:
    text = format_table(TABLE)
    lines = text.splitlines()
    assert lines[0].split() == ["n", "es", "name"]
    assert "NULL" in lines[3]
    assert lines[-1] == "(2 rows)"


def test_csv_and_json() -> None:
    assert format_table(TABLE, "csv").splitlines() == ["n,es,name", "1,0.5,a", "20,,bb"]
    assert json.loads(format_table(TABLE, "json"))[1] == {"n": 20, "es": None, "name": "bb"}
