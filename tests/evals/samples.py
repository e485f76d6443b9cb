"""Evaluation reports to render: a comparison of four models and an alpha sweep."""

from __future__ import annotations

from app.evals.models import EvalReport, EvalSpec, ModelEval, SuiteName, SuiteScore

SUITES = (SuiteName.chat_format, SuiteName.ifeval_lite, SuiteName.perplexity)


def score(suite: str, **metrics: float) -> SuiteScore:
    return SuiteScore(suite=suite, metrics=metrics, n=24, seconds=2.5, requests_per_s=9.6)


def model(
    label: str,
    fmt: float | None,
    ifeval: float | None,
    ppl: tuple[float, float] | None,
    alpha: float | None = None,
    key: str | None = None,
) -> ModelEval:
    """A model with the three built-in suites (None: that suite was not run)."""
    suites: dict[str, SuiteScore] = {}
    if fmt is not None:
        suites["format"] = score("format", format=fmt, stop_rate=fmt, open_rate=1.0)
    if ifeval is not None:
        suites["ifeval-lite"] = score(
            "ifeval-lite", prompt_strict=ifeval, instruction_strict=min(1.0, ifeval + 0.1)
        )
    if ppl is not None:
        suites["perplexity"] = score("perplexity", ppl_general=ppl[0], ppl_news=ppl[1])
    return ModelEval(
        label=label, model=f"/models/{label}", alpha=alpha, content_key=key, suites=suites
    )


def comparison() -> EvalReport:
    """base, instruct, target and a merge; the merge was not scored on perplexity."""
    return EvalReport(
        spec=EvalSpec(suites=SUITES, texts={"news": "/data/news.txt"}, limit=24),
        models=(
            model("base", 0.10, 0.20, (12.0, 30.0), key="b" * 64),
            model("instruct", 0.95, 0.70, (14.0, 32.0), key="1" * 64),
            model("target", 0.05, 0.15, (11.0, 9.0), key="7" * 64),
            model("merge", 0.92, 0.70, None, key="e" * 64),
        ),
    )


ALPHAS = (0.25, 0.5, 0.75, 1.0)
OBJECTIVE = "maximise ifeval-lite prompt_strict subject to ppl_news <= 1.05x target's"


def sweep() -> EvalReport:
    """An alpha sweep over four alphas beside its three references; alpha=0.75 chosen."""
    refs = comparison().models[:3]
    points = tuple(
        model(f"alpha={a:g}", 0.3 + 0.6 * a, 0.2 + 0.5 * a, (11 + 2 * a, 9 + 4 * a * a), alpha=a)
        for a in ALPHAS
    )
    return EvalReport(
        spec=EvalSpec(suites=SUITES, texts={"news": "/data/news.txt"}),
        models=refs + points,
        objective=OBJECTIVE,
        chosen="alpha=0.75",
    )
