"""Arrow schemas are derived from the row models, nullable exactly where the model allows None."""

from __future__ import annotations

import pyarrow as pa

from seqedit.schemas.tables import TABLES, EvalRow, arrow_schema


def test_every_table_has_a_derivable_schema() -> None:
    for name, row_model in TABLES.items():
        schema = arrow_schema(row_model)
        assert schema.names == list(row_model.model_fields), name


def test_types_and_nullability() -> None:
    schema = arrow_schema(EvalRow)
    assert schema.field("es").type == pa.float64() and schema.field("es").nullable
    assert schema.field("case_id").type == pa.int64() and not schema.field("case_id").nullable
    assert schema.field("protocol").type == pa.string()
