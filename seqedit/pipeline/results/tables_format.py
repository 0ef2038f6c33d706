"""Printing Arrow tables in the terminal as an aligned table, CSV or JSON."""

from __future__ import annotations

import csv
import io
import json
import math
from typing import Any, Literal

import pyarrow as pa

OutputFormat = Literal["table", "csv", "json"]


def _cell(value: Any) -> str:
    if value is None:
        return "NULL"
    if isinstance(value, float):
        if math.isnan(value):
            return "NaN"
        return f"{value:.4g}" if abs(value) < 1e5 else f"{value:.4e}"
    return str(value)


def format_table(table: pa.Table, fmt: OutputFormat = "table", *, max_rows: int = 200) -> str:
    """Render `table` for a terminal; `table` format truncates after `max_rows` rows."""
    rows = table.to_pylist()
    columns = table.column_names
    if fmt == "json":
        return json.dumps(rows, indent=2, default=str)
    if fmt == "csv":
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        return buffer.getvalue().rstrip("\n")
    shown = rows[:max_rows]
    cells = [[_cell(r[c]) for c in columns] for r in shown]
    widths = [max([len(c), *(len(row[i]) for row in cells)]) for i, c in enumerate(columns)]
    numeric = [pa.types.is_integer(f.type) or pa.types.is_floating(f.type) for f in table.schema]

    def line(values: list[str]) -> str:
        parts = [
            v.rjust(w) if num else v.ljust(w)
            for v, w, num in zip(values, widths, numeric, strict=True)
        ]
        return "  ".join(parts).rstrip()

    out = [line(columns), "  ".join("-" * w for w in widths)]
    out.extend(line(row) for row in cells)
    footer = f"({len(rows)} row{'s' if len(rows) != 1 else ''}"
    footer += f", first {max_rows} shown)" if len(rows) > max_rows else ")"
    out.append(footer)
    return "\n".join(out)
