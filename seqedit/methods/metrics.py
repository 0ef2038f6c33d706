"""CounterFact metric definitions (ROME/MEMIT papers), each with its version and direction.

Per record, from teacher-forced scores (see `scoring.py`), with P = exp(-mean token NLL):
  ES = [P(new) > P(true)] on the rewrite prompt          EM = P(new) - P(true)
  PS = mean over paraphrases of [P(new) > P(true)]       PM = mean P(new) - P(true)
  NS = mean over neighbours of [P(true) > P(new)]        NM = mean P(true) - P(new)
Campaign-level values are means over records; Score = harmonic mean of ES, PS and NS.
A neighbour's "true" target is its own recorded answer (for CounterFact, the edited
record's target_true, since neighbours share the true object).

Token accuracies (EasyEdit, and MEMIT's zsRE), per record: the share of answer tokens that
are the argmax at their teacher-forced position, averaged over the record's prompts of a
kind: rewrite (target_new), rephrase (target_new on paraphrases), locality (a neighbour's
own answer), portability (a portability question's answer). EasyEdit's *locality* is not
an accuracy but an agreement: the share of a neighbour answer's positions whose post-edit
argmax equals the base model's argmax there (then averaged over neighbours).
zsRE accuracy (MEMIT) is rewrite_acc / rephrase_acc / locality_acc on zsRE records.
Fluency and perplexity are defined in `fluency.py` and `locality.perplexity`.
"""

from __future__ import annotations

from collections.abc import Sequence
from statistics import harmonic_mean

from pydantic import BaseModel, ConfigDict

from seqedit.methods.fluency import FLUENCY_VERSION

METRIC_VERSION = "counterfact-2"
"""Version of an evaluation row's metric set. 2 added the token accuracies, locality
agreement, portability and fluency; ES/PS/NS and EM/PM/NM are unchanged since 1."""
TOKEN_ACCURACY_VERSION = "token-accuracy-1"
PERPLEXITY_VERSION = "perplexity-1"


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
        *(
            MetricInfo(
                name=name,
                version=TOKEN_ACCURACY_VERSION,
                higher_is_better=True,
                description=description,
            )
            for name, description in [
                ("rewrite_acc", "Token accuracy of target_new on the rewrite prompt"),
                ("rephrase_acc", "Token accuracy of target_new on the paraphrases"),
                ("locality_acc", "Token accuracy of each neighbour's own answer"),
                ("locality_agreement", "Share of neighbour-answer argmax tokens unchanged"),
                ("portability_acc", "Token accuracy of the portability answers"),
            ]
        ),
        MetricInfo(
            name="fluency",
            version=FLUENCY_VERSION,
            higher_is_better=True,
            description="Weighted bi/tri-gram entropy of sampled generations (bits)",
        ),
        MetricInfo(
            name="perplexity",
            version=PERPLEXITY_VERSION,
            higher_is_better=False,
            description="Perplexity of held-out text (exp of mean token NLL)",
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


def mean(values: Sequence[float]) -> float | None:
    """Arithmetic mean; None for no values."""
    return sum(values) / len(values) if values else None


def agreement(before: Sequence[Sequence[int]], after: Sequence[Sequence[int]]) -> float | None:
    """EasyEdit locality: per prompt the share of positions where the argmax token ids agree
    (`before[i]` vs `after[i]`, same length), averaged over prompts; None for no prompts."""
    shares = []
    for old, new in zip(before, after, strict=True):
        if len(old) != len(new) or not old:
            raise ValueError(f"argmax rows of lengths {len(old)} and {len(new)} do not align")
        shares.append(sum(a == b for a, b in zip(old, new, strict=True)) / len(old))
    return mean(shares)
