"""CounterFact metric definitions (ROME/MEMIT papers), each with its version and direction.

Per record, from teacher-forced scores (see `scoring.py`), with P = exp(-mean token NLL):
  ES = [P(new) > P(true)] on the rewrite prompt          EM = P(new) - P(true)
  PS = mean over paraphrases of [P(new) > P(true)]       PM = mean P(new) - P(true)
  NS = mean over neighbours of [P(true) > P(new)]        NM = mean P(true) - P(new)
Campaign-level values are means over records; Score = harmonic mean of ES, PS and NS.
A neighbour's "true" target is its own recorded answer (for CounterFact, the edited
record's target_true, since neighbours share the true object).
"""

from __future__ import annotations

from collections.abc import Sequence
from statistics import harmonic_mean

from pydantic import BaseModel, ConfigDict

METRIC_VERSION = "counterfact-1"


class MetricInfo(BaseModel):
    """Metadata that travels with a metric: what it is and which way is better."""

    model_config = ConfigDict(frozen=True)

    name: str
    version: str
    higher_is_better: bool
    description: str


METRICS: dict[str, MetricInfo] = {
    info.name: info
    for info in [
        MetricInfo(
            name="es",
            version=METRIC_VERSION,
            higher_is_better=True,
            description="Efficacy score: P(new) > P(true) on the rewrite prompt",
        ),
        MetricInfo(
            name="ps",
            version=METRIC_VERSION,
            higher_is_better=True,
            description="Paraphrase score: P(new) > P(true) on paraphrase prompts",
        ),
        MetricInfo(
            name="ns",
            version=METRIC_VERSION,
            higher_is_better=True,
            description="Neighbourhood score: P(true) > P(new) on neighbour prompts",
        ),
        MetricInfo(
            name="em",
            version=METRIC_VERSION,
            higher_is_better=True,
            description="Efficacy magnitude: P(new) - P(true) on the rewrite prompt",
        ),
        MetricInfo(
            name="pm",
            version=METRIC_VERSION,
            higher_is_better=True,
            description="Paraphrase magnitude: P(new) - P(true) on paraphrase prompts",
        ),
        MetricInfo(
            name="nm",
            version=METRIC_VERSION,
            higher_is_better=True,
            description="Neighbourhood magnitude: P(true) - P(new) on neighbour prompts",
        ),
        MetricInfo(
            name="score",
            version=METRIC_VERSION,
            higher_is_better=True,
            description="Harmonic mean of ES, PS and NS",
        ),
    ]
}


def wins(p_better: Sequence[float], p_worse: Sequence[float]) -> float | None:
    """Mean of [p_better[i] > p_worse[i]]; None for no prompts."""
    if not p_better:
        return None
    return sum(b > w for b, w in zip(p_better, p_worse, strict=True)) / len(p_better)


def margin(p_better: Sequence[float], p_worse: Sequence[float]) -> float | None:
    """Mean of p_better[i] - p_worse[i]; None for no prompts."""
    if not p_better:
        return None
    return sum(b - w for b, w in zip(p_better, p_worse, strict=True)) / len(p_better)


def score(es: float, ps: float, ns: float) -> float:
    """Harmonic mean of ES, PS, NS (0 when any is 0)."""
    return harmonic_mean([es, ps, ns]) if min(es, ps, ns) > 0 else 0.0
