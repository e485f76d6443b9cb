"""What a report shows of an :class:`EvalReport`: its metric columns, each metric's
direction, each suite's headline metric, and the best value of a column."""

from __future__ import annotations

import math
from dataclasses import dataclass

from app.evals.models import HEADLINE, EvalReport, ModelEval, SuiteName, SuiteScore

# Every metric of these built-in suites is a rate of passed checks.
RATES = (SuiteName.chat_format.value, SuiteName.ifeval_lite.value)


@dataclass(frozen=True)
class Column:
    """One metric of one suite, and whether higher is better (None: not stated)."""

    suite: str
    metric: str
    higher: bool | None


def direction(score: SuiteScore, metric: str) -> bool | None:
    """Whether a higher ``metric`` is better: as the suite states it, else as the
    built-in headlines say, else lower for a perplexity and higher for the rates of the
    built-in generation suites; None when nothing says (custom metrics).

    Args:
        score: The suite's outcome that holds ``metric``.
        metric: The metric's name.

    Returns:
        True (higher is better), False (lower is better) or None (unknown).
    """
    if metric in score.higher_is_better:
        return score.higher_is_better[metric]
    for suite, (name, higher) in HEADLINE.items():
        if suite.value == score.suite and name == metric:
            return higher
    if score.suite == SuiteName.perplexity.value or metric.startswith("ppl_"):
        return False
    if score.suite in RATES:
        return True
    return None


def headline(score: SuiteScore) -> str | None:
    """The metric a plot shows for a suite: the built-in headline when present, else
    the suite's first metric (custom suites); None when the suite has no metric."""
    for suite, (name, _) in HEADLINE.items():
        if suite.value == score.suite and name in score.metrics:
            return name
    return next(iter(score.metrics), None)


def suite_order(report: EvalReport) -> list[str]:
    """Suites in the order the spec lists them, then any others in order of appearance."""
    order = [s.value for s in report.spec.suites]
    for model in report.models:
        order += [name for name in model.suites if name not in order]
    return [name for name in order if any(name in m.suites for m in report.models)]


def columns(report: EvalReport) -> list[Column]:
    """Every metric of every suite any model has, grouped by suite, in order of appearance."""
    found: list[Column] = []
    for suite in suite_order(report):
        seen: dict[str, bool | None] = {}
        for model in report.models:
            score = model.suites.get(suite)
            for metric in score.metrics if score else ():
                if score and seen.get(metric) is None:
                    seen[metric] = direction(score, metric)
        found += [Column(suite, metric, higher) for metric, higher in seen.items()]
    return found


def value(model: ModelEval, column: Column) -> float | None:
    """The model's value in ``column``; None when the suite or metric is missing."""
    score = model.suites.get(column.suite)
    return None if score is None else score.metrics.get(column.metric)


def best(values: list[float | None], higher: bool | None) -> float | None:
    """The best finite value of a column, or None when the direction is unknown or
    fewer than two models have a finite value (nothing to compare)."""
    finite = [v for v in values if v is not None and math.isfinite(v)]
    if higher is None or len(finite) < 2:
        return None
    return max(finite) if higher else min(finite)


def is_best(v: float | None, top: float | None) -> bool:
    """Whether ``v`` ties the column's best value."""
    return v is not None and top is not None and math.isclose(v, top, rel_tol=1e-12)


def chosen_model(report: EvalReport) -> ModelEval | None:
    """The model the report's ``chosen`` label names, if it is among the models."""
    return next((m for m in report.models if m.label == report.chosen), None)
