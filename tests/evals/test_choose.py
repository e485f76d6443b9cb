"""The sweep's pick: the best headline score within the perplexity bound, ties to the
alpha nearest 1, and a clear error when nothing qualifies."""

from __future__ import annotations

import pytest

from app.evals.choose import NoAlphaError, SweepObjective, choose_alpha
from app.evals.models import EvalReport, EvalRequest, ModelEval, SuiteScore


def _model(label: str, alpha: float | None, ifeval: float | None, **ppl: float) -> ModelEval:
    suites = {"perplexity": SuiteScore(suite="perplexity", metrics=ppl, n=10, seconds=1.0)}
    if ifeval is not None:
        suites["ifeval-lite"] = SuiteScore(
            suite="ifeval-lite", metrics={"prompt_strict": ifeval}, n=10, seconds=1.0
        )
    return ModelEval(label=label, model=label, alpha=alpha, suites=suites)


def _report(*models: ModelEval) -> EvalReport:
    return EvalReport(spec=EvalRequest(), models=models)


def test_picks_the_best_score_within_the_domain_bound() -> None:
    report = _report(
        _model("target", None, 0.1, ppl_general=20.0, ppl_news=10.0),
        _model("alpha=0.5", 0.5, 0.6, ppl_general=30.0, ppl_news=10.2),
        _model("alpha=1.0", 1.0, 0.8, ppl_general=21.0, ppl_news=10.4),
        _model("alpha=1.5", 1.5, 0.9, ppl_general=21.0, ppl_news=11.0),  # 1.1x: out
    )
    picked = choose_alpha(report, SweepObjective())
    assert picked.chosen == "alpha=1.0"
    assert picked.rejected == {"alpha=1.5": "ppl_news 1.1x the target's (limit 1.05x)"}
    assert "ppl_news <= 1.05x the target's" in (picked.objective or "")
    # the general set is bounded only when no domain text was given
    assert "ppl_general" not in (picked.objective or "")


def test_general_set_is_bounded_without_domain_texts_and_ties_go_near_one() -> None:
    report = _report(
        _model("target", None, 0.1, ppl_general=20.0),
        _model("alpha=0.5", 0.5, 0.7, ppl_general=20.5),
        _model("alpha=0.75", 0.75, 0.7, ppl_general=20.5),
        _model("alpha=2.0", 2.0, 0.9, ppl_general=40.0),
    )
    assert choose_alpha(report, SweepObjective()).chosen == "alpha=0.75"
    loose = SweepObjective(perplexity_limit=2.5)
    assert choose_alpha(report, loose).chosen == "alpha=2.0"


def test_nothing_within_the_bound_is_a_clear_error() -> None:
    report = _report(
        _model("target", None, 0.1, ppl_general=10.0),
        _model("alpha=1.0", 1.0, 0.9, ppl_general=12.0),
    )
    with pytest.raises(NoAlphaError, match="sweep smaller alphas or raise perplexity_limit") as e:
        choose_alpha(report, SweepObjective())
    assert "alpha=1.0: ppl_general 1.2x the target's (limit 1.05x)" in str(e.value)
    # the error keeps the scores, the objective and why each alpha was left out
    assert e.value.report is not None and e.value.report.chosen is None
    assert e.value.report.models == report.models
    assert e.value.report.objective == SweepObjective().words(["ppl_general"])
    assert e.value.report.rejected == {"alpha=1.0": "ppl_general 1.2x the target's (limit 1.05x)"}


def test_an_alpha_without_the_maximised_score_or_its_perplexity_is_left_out() -> None:
    no_ppl = ModelEval(label="alpha=0.5", model="m", alpha=0.5, suites={})
    report = _report(
        _model("target", None, 0.1, ppl_general=10.0, ppl_news=5.0),
        _model("alpha=1.0", 1.0, None, ppl_general=10.0, ppl_news=5.0),
        no_ppl,
        _model("alpha=0.25", 0.25, 0.3, ppl_general=10.0),  # its ppl_news was not finite
    )
    with pytest.raises(NoAlphaError) as e:
        choose_alpha(report, SweepObjective())
    assert e.value.report is not None
    assert e.value.report.rejected == {
        "alpha=1.0": "ifeval-lite prompt_strict not scored",
        "alpha=0.5": "ifeval-lite prompt_strict not scored",
        "alpha=0.25": "ppl_news not scored",
    }


def test_objective_rejects_a_bound_that_allows_nothing() -> None:
    with pytest.raises(ValueError):
        SweepObjective(perplexity_limit=1.0)
