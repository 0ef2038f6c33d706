"""A valid EditRow for store and CLI tests, with any field overridden."""

from __future__ import annotations

from typing import Any

from seqedit.schemas.tables import EditRow


def edit_row(step: int, case_id: int, **overrides: Any) -> EditRow:
    """An applied, successful edit at `step` of campaign "c"."""
    fields: dict[str, Any] = {
        "campaign": "c",
        "step": step,
        "case_id": case_id,
        "method": "rome",
        "method_version": "1",
        "layers": "1",
        "p_new_before": 0.1,
        "p_true_before": 0.5,
        "p_new_after": 0.9,
        "p_true_after": 0.05,
        "success": True,
        "loss_initial": 3.0,
        "loss": 0.1,
        "opt_steps": 5,
        "update_norm": 1.0,
        "weight_drift": 0.01,
        "seconds": 0.1,
    }
    return EditRow(**(fields | overrides))
