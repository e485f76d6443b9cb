"""The demo's evidence: the four models scored on the evaluation suites.

The story in numbers: the merge should follow the chat format like the instruct model
(format score at least 0.9x the instruct model's) and know the news like the new base
(perplexity on the news it read at most 1.2x the new base's). Both ratios are printed
with whether they hold, as measured.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console

from app.demo.tiny import TinyTriple
from app.demo.train import NEWS_INTRO, news_facts
from app.evals.models import EvalProgress, EvalSpec, EvalTarget, SuiteName, SuiteScore

FORMAT_RATIO = 0.9  # merge's format score / instruct's, at least
PPL_RATIO = 1.2  # merge's news perplexity / new_base's, at most
MAX_TOKENS = 64  # the demo's answers are one short sentence


def news_text() -> str:
    """The news as the new base read it (one document a line): each fact's sentence,
    and the article that leads with ``NEWS_INTRO``."""
    lines = []
    for fact in news_facts():
        lines += [fact.sentence(), f"{NEWS_INTRO.format(town=fact.subject)} {fact.sentence()}"]
    return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class DemoScores:
    """Each model's scores, by label (``base``, ``instruct``, ``new_base``, ``merged``)."""

    scores: dict[str, dict[str, SuiteScore]]

    def metric(self, label: str, suite: SuiteName, name: str) -> float:
        return self.scores[label][suite].metrics[name]

    @property
    def format_ratio(self) -> float:
        """The merge's format score over the instruct model's."""
        instruct = self.metric("instruct", SuiteName.chat_format, "format")
        merged = self.metric("merged", SuiteName.chat_format, "format")
        return merged / instruct if instruct else float("inf") if merged else 1.0

    @property
    def ppl_ratio(self) -> float:
        """The merge's news perplexity over the new base's."""
        new_base = self.metric("new_base", SuiteName.perplexity, "ppl_news")
        return self.metric("merged", SuiteName.perplexity, "ppl_news") / new_base


def score_demo(
    triple: TinyTriple,
    merged: Path,
    workdir: Path,
    *,
    progress: Callable[[EvalProgress], None] | None = None,
    limit: int | None = None,
    suites: tuple[SuiteName, ...] = (
        SuiteName.chat_format,
        SuiteName.ifeval_lite,
        SuiteName.perplexity,
    ),
) -> DemoScores:
    """Score base, instruct, new_base and the merge: format, ifeval-lite, and perplexity on
    the news (one engine on loopback, each model swapped into it in turn).

    Args:
        triple: the demo's trained models.
        merged: the merged model's directory.
        workdir: receives the news text and the evaluation's logs.
        progress: receives each step (``model`` is the label).
        limit: at most this many examples per suite (tests use a few).
        suites: which suites (perplexity always scores the news too).
    """
    from app.evals.runner import evaluate_models

    workdir.mkdir(parents=True, exist_ok=True)
    news = workdir / "news.txt"
    news.write_text(news_text())
    spec = EvalSpec(
        suites=suites,
        texts={"news": str(news)},
        limit=limit,
        max_tokens=MAX_TOKENS,
    )
    # The bases have no chat template: they chat in the instruct model's, as the merge does.
    template = str(triple.instruct)
    models = {
        "base": EvalTarget(model=str(triple.base), chat_template_from=template),
        "instruct": EvalTarget(model=str(triple.instruct)),
        "new_base": EvalTarget(model=str(triple.new_base), chat_template_from=template),
        "merged": EvalTarget(model=str(merged)),
    }
    labels = {target.model: label for label, target in models.items()}

    def relabel(p: EvalProgress) -> None:
        if progress is not None:
            progress(p.model_copy(update={"model": labels.get(p.model, p.model)}))

    results = evaluate_models(
        list(models.values()), spec, progress=relabel, log_dir=workdir / "eval"
    )
    return DemoScores(dict(zip(models, results, strict=True)))


def print_scores(result: DemoScores, stdout: Console) -> None:
    """A table of the scores, then the two ratios of the story and whether they hold."""
    stdout.print(f"{'model':<10} {'format':>7} {'ifeval-lite':>12} {'news ppl':>9}")
    for label in result.scores:
        stdout.print(
            f"{label:<10} {result.metric(label, SuiteName.chat_format, 'format'):>7.2f} "
            f"{result.metric(label, SuiteName.ifeval_lite, 'prompt_strict'):>12.2f} "
            f"{result.metric(label, SuiteName.perplexity, 'ppl_news'):>9.2f}",
            highlight=False,
        )
    fmt, ppl = result.format_ratio, result.ppl_ratio
    stdout.print(
        f"merged vs instruct, format: {fmt:.2f}x (story: >= {FORMAT_RATIO}x: "
        f"{'holds' if fmt >= FORMAT_RATIO else 'does not hold'}); merged vs new_base, news "
        f"perplexity: {ppl:.2f}x (story: <= {PPL_RATIO}x: "
        f"{'holds' if ppl <= PPL_RATIO else 'does not hold'})",
        highlight=False,
        soft_wrap=True,
    )
