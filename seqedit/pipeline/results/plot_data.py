"""The series behind the norm-growth plot, read from a campaign's DuckDB views."""

from __future__ import annotations

import pyarrow as pa

from seqedit.pipeline.results.views import query
from seqedit.storage import Where
from seqedit.workers.health import DRIFT_PREFIX

NORM_WINDOW = 50
"""Edits in the rolling median of the update norm."""

UPDATE_NORMS_SQL = """
WITH numbered AS (SELECT *, count(*) OVER (ORDER BY step) AS n FROM edits)
SELECT n, update_norm, rolled_back,
       CASE WHEN NOT rolled_back THEN
         median(CASE WHEN NOT rolled_back THEN update_norm END) OVER (
           ORDER BY step, case_id ROWS BETWEEN {preceding} PRECEDING AND CURRENT ROW)
       END AS rolling_median
FROM numbered
ORDER BY step, case_id
"""
"""One row per edit: edits applied so far (`n`), its update norm, whether it was rolled
back, and (kept edits only) the median norm of the kept edits among the last rows."""

LAYER_DRIFT_SQL = f"""
WITH applied AS (SELECT DISTINCT step, count(*) OVER (ORDER BY step) AS n FROM edits)
SELECT substr(check_name, {len(DRIFT_PREFIX) + 1}) AS layer, n, value AS drift
FROM health JOIN applied USING (step)
WHERE starts_with(check_name, '{DRIFT_PREFIX}') AND NOT isnan(value)
ORDER BY layer, step
"""
"""The periodic `weight_drift.<module>` checks: one row per edited module and check point."""

EDIT_DRIFT_LAYER = "max over layers (per edit)"
EDIT_DRIFT_SQL = f"""
WITH numbered AS (SELECT *, count(*) OVER (ORDER BY step) AS n FROM edits)
SELECT '{EDIT_DRIFT_LAYER}' AS layer, n, max(weight_drift) AS drift
FROM numbered WHERE NOT rolled_back
GROUP BY step, n
ORDER BY step
"""
"""Fallback without periodic drift rows: the edit rows' largest layer drift, per step."""


def update_norms(campaign_dir: Where, window: int = NORM_WINDOW) -> pa.Table:
    """UPDATE_NORMS_SQL over a rolling window of `window` edits."""
    return query(campaign_dir, UPDATE_NORMS_SQL.format(preceding=window - 1))


def layer_drift(campaign_dir: Where) -> pa.Table:
    """Relative drift ||W_t - W_0||_F / ||W_0||_F against edits applied, columns `layer`,
    `n`, `drift`: per edited module from the periodic checks, else from the edit rows."""
    per_layer = query(campaign_dir, LAYER_DRIFT_SQL)
    return per_layer if per_layer.num_rows else query(campaign_dir, EDIT_DRIFT_SQL)
