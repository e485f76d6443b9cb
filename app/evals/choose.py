"""Which alpha of a sweep to publish: the stated objective, applied to the scores.

Maximise the headline score of one suite (ifeval-lite by default) over the alphas whose
perplexity stays within a factor of the target's (the new base's) on the domain texts
(or on the general set when none were given): the merge should follow instructions
without forgetting what the new base learned. Ties go to the alpha nearest 1.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, field_validator

from app.core.errors import RealignError
from app.evals.models import HEADLINE, EvalReport, ModelEval, SuiteName

TARGET = "target"


class NoAlphaError(RealignError, ValueError):
    """No alpha of a sweep met the objective.

    Args:
        message: what happened and what to do.
        report: the sweep's report with its objective and why each alpha was left out
            (``chosen`` None), when the scores are known.
    """

    code = "no_alpha_meets_objective"

    def __init__(self, message: str, report: EvalReport | None = None) -> None:
        super().__init__(message)
        self.report = report


class SweepObjective(BaseModel):
    """How a sweep picks its alpha."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    maximize: SuiteName = Field(
        default=SuiteName.ifeval_lite,
        description="The suite whose headline score is maximised (format or ifeval-lite).",
    )
    perplexity_limit: float = Field(
        default=1.05,
        gt=1.0,
        le=10.0,
        description="Each alpha's perplexity must stay within this factor of the target's "
        "(domain texts when given, else the general set).",
    )

    def words(self, metrics: list[str]) -> str:
        """The objective as a sentence, naming the perplexity metrics it bounds."""
        metric = HEADLINE[self.maximize][0]
        score = " ".join(dict.fromkeys((self.maximize.value, metric)))  # not "format format"
        bound = ", ".join(metrics) or "perplexity"
        return (
            f"maximise {score} subject to {bound} <= "
            f"{self.perplexity_limit:g}x the target's; ties to the alpha nearest 1"
        )


def domain_metrics(target: ModelEval) -> list[str]:
    """The perplexity metrics the bound applies to: every text set but the general one
    when the user gave any, else the general set."""
    ppl = target.suites.get(SuiteName.perplexity.value)
    names = sorted(ppl.metrics) if ppl else []
    own = [m for m in names if m.startswith("ppl_") and m != "ppl_general"]
    return own or [m for m in names if m == "ppl_general"]


def choose_alpha(report: EvalReport, objective: SweepObjective) -> EvalReport:
    """The report with its pick (``chosen``: the label of the best alpha), the objective
    in words, and why each alpha it did not consider was left out (``rejected``).

    Raises:
        NoAlphaError: no alpha stays within the perplexity bound, or none was scored; it
            carries the report (``chosen`` None) so the scores still reach the user.
    """
    target = next((m for m in report.models if m.label == TARGET), None)
    metrics = domain_metrics(target) if target else []
    metric = HEADLINE[objective.maximize][0]
    candidates: list[tuple[float, float, str]] = []
    rejected: dict[str, str] = {}
    for m in report.models:
        if m.alpha is None:
            continue
        score = m.suites.get(objective.maximize.value)
        if score is None or metric not in score.metrics:
            rejected[m.label] = f"{objective.maximize.value} {metric} not scored"
        elif over := _over(m, target, metrics, objective.perplexity_limit):
            rejected[m.label] = over
        else:
            candidates.append((score.metrics[metric], -abs(m.alpha - 1.0), m.label))
    words = objective.words(metrics)
    update: dict[str, object] = {"objective": words, "rejected": rejected}
    if not candidates:
        why = "; ".join(f"{label}: {reason}" for label, reason in rejected.items())
        raise NoAlphaError(
            f"no alpha of the sweep meets the objective ({words}): {why or 'no alpha scored'}"
            "; look at the scores in the job's report, then sweep smaller alphas or raise "
            "perplexity_limit",
            report.model_copy(update=update | {"chosen": None}),
        )
    best = max(candidates)
    return report.model_copy(update=update | {"chosen": best[2]})


def _over(m: ModelEval, target: ModelEval | None, metrics: list[str], limit: float) -> str:
    """Why ``m``'s perplexity breaks the bound (each metric over it), or '' within it."""
    if target is None or not metrics:
        return ""
    mine = m.suites.get(SuiteName.perplexity.value)
    ref = target.suites[SuiteName.perplexity.value]
    out = []
    for name in metrics:
        value = mine.metrics.get(name) if mine else None
        if value is None:
            out.append(f"{name} not scored")
        elif (ratio := value / ref.metrics[name]) > limit:
            out.append(f"{name} {ratio:.4g}x the target's (limit {limit:g}x)")
    return ", ".join(out)


class AlphaSweep(SweepObjective):
    """``"alpha": {"sweep": [...]}``: merge at each alpha in the engine, evaluate each, and
    publish the one the objective picks."""

    sweep: tuple[float, ...] = Field(
        min_length=2,
        max_length=16,
        description="The alphas to try (each in [-10, 10], no repeats).",
        examples=[[0.25, 0.5, 0.75, 1.0]],
    )

    @field_validator("sweep")
    @classmethod
    def _distinct(cls, values: tuple[float, ...]) -> tuple[float, ...]:
        if any(not -10.0 <= v <= 10.0 for v in values):
            raise ValueError("every alpha of a sweep is in [-10, 10]")
        if len(set(values)) != len(values):
            raise ValueError("an alpha appears twice in the sweep")
        return tuple(sorted(values))
