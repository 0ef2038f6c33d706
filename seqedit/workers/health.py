"""Health checks after every edit: is the edit verified, is the update sane, is the run
trending towards collapse? Pure bookkeeping over `EditRow`s, no model access.

Per edit: `verified` (P(new) > P(true) right after the edit) and, when configured,
`update_norm`. Over a rolling window of the last `window` edits that stayed in the model:
`success_rate` (share verified) and `target_prob` (median P(new) after the edit; the ROME
collapse shows as a value stuck near 1e-5). A trend check fails only once its window is
full. Each result is a `HealthRow`; a failed check carries its policy as `action`.
"""

from __future__ import annotations

import math
import statistics
from collections import deque

from seqedit.schemas.campaign import HealthSpec
from seqedit.schemas.tables import EditRow, HealthAction, HealthRow

_SEVERITY = {"none": 0, "record": 1, "retry": 2, "skip": 3, "stop": 4}

PERIODIC_CHECKS = (
    "retention", "locality_kl", "locality_top1", "perplexity", "perplexity_ratio", "memory_size",
    "scope_hit_rate",
)  # fmt: skip
"""Names of the periodic checks, besides one `weight_drift.<module>` per edited module
(`memory_size`, the entries of a memory-based method's memory, and `scope_hit_rate`, the
share of locality probes SERAC's classifier routes to an edit, are recorded, not judged)."""
DRIFT_PREFIX = "weight_drift."
NOT_FOR_MEMORY = frozenset({"update_norm", "weight_drift"})
"""Checks that mean nothing for a memory-based method (it changes no weight): skipped for
its edits (rows with a `memory_size`), which record the memory size instead."""


class HealthMonitor:
    """Checks each new edit row against `spec`; remembers the window of kept edits."""

    def __init__(self, spec: HealthSpec, campaign: str) -> None:
        self.spec = spec
        self.campaign = campaign
        self.window: deque[EditRow] = deque(maxlen=spec.window)

    def observe(self, step_rows: list[EditRow]) -> list[HealthRow]:
        """The check rows of one edit step just applied (one row per request of the step):
        per-edit checks of each row, then the trends over the window the step would join
        (attributed to the step's last row); see `action` for what to do."""
        spec = self.spec
        rows: list[HealthRow] = []
        for row in step_rows:
            rows.append(
                self._row(row, "verified", float(row.success), 1.0, row.success, spec.on_unverified)
            )
            if spec.max_update_norm is not None and not _skipped(row, "update_norm"):
                assert row.update_norm is not None  # a weight-editing method's row
                ok = math.isfinite(row.update_norm) and row.update_norm <= spec.max_update_norm
                rows.append(
                    self._row(
                        row, "update_norm", row.update_norm, spec.max_update_norm, ok,
                        spec.on_update_norm,
                    )
                )  # fmt: skip
        last = step_rows[-1]
        window = [*self.window, *step_rows][-spec.window :]
        full = len(window) >= spec.window
        if spec.min_success_rate is not None:
            rate = sum(r.success for r in window) / len(window)
            ok = not full or rate >= spec.min_success_rate
            rows.append(
                self._row(last, "success_rate", rate, spec.min_success_rate, ok, spec.on_trend)
            )
        if spec.min_target_prob is not None:
            median = statistics.median(r.p_new_after for r in window)
            ok = not full or median >= spec.min_target_prob
            rows.append(
                self._row(last, "target_prob", median, spec.min_target_prob, ok, spec.on_trend)
            )
        return rows

    def periodic(
        self, edit: EditRow, metrics: dict[str, float], *, seconds: float = 0.0
    ) -> list[HealthRow]:
        """Rows of the periodic checks after `edit` (`SequentialEditor.periodic_health`,
        which took `seconds`). A failure takes `on_periodic`; `retry` and `skip` mean
        `record` here (there is no single edit to redo or undo)."""
        spec = self.spec
        policy: HealthAction = "stop" if spec.on_periodic == "stop" else "record"
        limits: dict[str, tuple[float | None, bool]] = {  # name -> (limit, higher is better)
            "retention": (spec.min_retention, True),
            "locality_kl": (spec.max_locality_kl, False),
            "locality_top1": (spec.min_locality_top1, True),
            "perplexity": (None, False),
            "perplexity_ratio": (spec.max_perplexity_ratio, False),
            "memory_size": (None, True),
            "scope_hit_rate": (None, False),
        }
        rows = []
        for name, value in sorted(metrics.items()):
            if name not in PERIODIC_CHECKS and not name.startswith(DRIFT_PREFIX):
                raise ValueError(f"unknown periodic health metric {name!r}")
            limit, higher = limits.get(name, (spec.max_weight_drift, False))
            ok = limit is None or (value >= limit if higher else value <= limit)
            rows.append(self._row(edit, name, value, limit, ok and math.isfinite(value), policy))
        share = seconds / len(rows) if rows else 0.0
        return [row.model_copy(update={"seconds": share}) for row in rows]

    def keep(self, step_rows: list[EditRow]) -> None:
        """The edits of `step_rows` stay in the model: they join the trend window."""
        self.window.extend(step_rows)

    def _row(
        self,
        edit: EditRow,
        check: str,
        value: float,
        threshold: float | None,
        passed: bool,
        policy: HealthAction,
    ) -> HealthRow:
        return HealthRow(
            campaign=self.campaign,
            step=edit.step,
            case_id=edit.case_id,
            check_name=check,
            value=value,
            threshold=threshold,
            passed=passed,
            action="none" if passed else policy,
            retry=edit.retries,
        )


def _skipped(row: EditRow, check: str) -> bool:
    """Whether `check` means nothing for the method of `row` (see `NOT_FOR_MEMORY`)."""
    return row.memory_size is not None and check in NOT_FOR_MEMORY


def action(rows: list[HealthRow]) -> HealthAction | None:
    """The most severe action among `rows` (stop > skip > retry > record), None when all
    passed."""
    worst = max((r.action for r in rows), key=_SEVERITY.__getitem__, default="none")
    return None if worst == "none" else worst  # type: ignore[return-value]
