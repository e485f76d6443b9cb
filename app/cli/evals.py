"""``realign eval``: score a model directory or a served model on the evaluation suites."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.table import Table

from app.cli.common import app, err, fail, friendly, out
from app.cli.extras import require
from app.evals.models import EvalProgress, EvalSpec, EvalTarget, ModelEval, SuiteName, SuiteScore

if TYPE_CHECKING:
    from collections.abc import Callable

# Options `realign eval` and `realign sweep` share.
Limit = Annotated[int | None, typer.Option("--limit", min=1, help="At most N examples per suite.")]
MaxTokens = Annotated[int, typer.Option("--max-tokens", min=1, help="Reply budget.")]
Concurrency = Annotated[
    int, typer.Option("--concurrency", min=1, max=256, help="Requests in flight.")
]
SUITE_HELP = (
    "Suite to run (repeat for several): format (replies end on the stop token within "
    "the budget and open as the assistant's turn), ifeval-lite (verifiable instructions, "
    "lm-eval's IFEval checkers), perplexity (token perplexity on a shipped general text and "
    "each --text), custom (your lm-eval --task names in --tasks-dir). Default: format and "
    "ifeval-lite; --text adds perplexity and --task adds custom."
)


def parse_texts(pairs: list[str]) -> dict[str, str]:
    texts: dict[str, str] = {}
    for pair in pairs:
        name, sep, path = pair.partition("=")
        if not sep or not name or not path:
            raise fail(f"--text {pair!r}: use NAME=FILE, e.g. --text news=data/news.txt", 2)
        if name in texts or name == "general":
            raise fail(f"--text {name}: given twice, or the reserved name 'general'", 2)
        texts[name] = path
    return texts


def _suites(chosen: list[SuiteName], texts: bool, tasks: bool) -> tuple[SuiteName, ...]:
    suites = chosen or [SuiteName.chat_format, SuiteName.ifeval_lite]
    implied = [SuiteName.perplexity] * texts + [SuiteName.custom] * tasks
    return tuple(dict.fromkeys([*suites, *implied]))


def _printer(quiet: bool) -> Callable[[EvalProgress], None]:
    """One line per step, and per tenth of a suite's examples."""
    shown: dict[str, int] = {}

    def show(p: EvalProgress) -> None:
        if quiet:
            return
        if p.message:
            line = f"{p.suite}: {p.message}" + (f" ({p.done}/{p.total})" if p.total else "")
        elif p.total and (p.done == p.total or p.done - shown.get(p.suite, 0) >= p.total / 10):
            line = f"{p.suite}: {p.done}/{p.total}"
        else:
            return
        shown[p.suite] = p.done
        err.print(line, highlight=False, soft_wrap=True)

    return show


def _table(result: ModelEval) -> Table:
    table = Table(title=f"{result.label}: {result.model}", title_justify="left")
    for column in ("suite", "metric", "value", "n", "seconds", "req/s"):
        table.add_column(column, justify="left" if column in ("suite", "metric") else "right")
    for suite, score in result.suites.items():
        for i, (metric, value) in enumerate(score.metrics.items()):
            arrow = "↑" if score.higher_is_better.get(metric, True) else "↓"
            rate = f"{score.requests_per_s:.2f}" if score.requests_per_s and not i else ""
            table.add_row(
                suite if not i else "",
                f"{metric} {arrow}",
                f"{value:.4g}",
                str(score.n) if not i else "",
                f"{score.seconds:.1f}" if not i else "",
                rate,
            )
    return table


def _save(
    weights: str | None, scores: dict[str, SuiteScore], target: EvalTarget, spec: EvalSpec
) -> None:
    from app.evals.results import save_scores

    if weights is None:
        return
    try:
        paths = save_scores(Path(weights), scores, target, spec)
    except OSError as exc:
        err.print(f"warning: results not saved next to the model: {exc}", highlight=False)
        return
    err.print(f"results in {paths[0].parent}/", highlight=False, soft_wrap=True)


@app.command("eval")
@friendly
def eval_(
    model: Annotated[
        str, typer.Argument(help="A model directory, or with --url the id of a served model.")
    ],
    suite: Annotated[list[SuiteName] | None, typer.Option("--suite", "-s", help=SUITE_HELP)] = None,
    text: Annotated[
        list[str] | None,
        typer.Option("--text", help="perplexity: NAME=FILE, a text to score (repeatable)."),
    ] = None,
    tasks_dir: Annotated[
        Path | None, typer.Option("--tasks-dir", help="custom: a directory of lm-eval task YAMLs.")
    ] = None,
    task: Annotated[
        list[str] | None, typer.Option("--task", help="custom: a task name there (repeatable).")
    ] = None,
    limit: Limit = None,
    max_tokens: MaxTokens = 128,
    concurrency: Concurrency = 8,
    url: Annotated[
        str | None,
        typer.Option(
            "--url",
            help="An OpenAI-compatible server serving MODEL (e.g. realign "
            "serve's http://127.0.0.1:8000); default: start an engine for the "
            "directory on loopback.",
        ),
    ] = None,
    model_dir: Annotated[
        Path | None,
        typer.Option("--model-dir", help="With --url: the model's weights, for perplexity."),
    ] = None,
    chat_template_from: Annotated[
        Path | None,
        typer.Option(
            "--chat-template-from",
            help="Chat in this directory's chat template and "
            "stop tokens (e.g. the instruct model's, for a base model).",
        ),
    ] = None,
    api_key: Annotated[
        str | None, typer.Option("--api-key", help="Bearer token for --url.", show_default=False)
    ] = None,
    save: Annotated[
        bool, typer.Option("--save/--no-save", help="Write DIR/eval/<suite>.json.")
    ] = True,
    as_json: Annotated[bool, typer.Option("--json", help="Print the scores as JSON.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress lines.")] = False,
) -> None:
    """Score a model on evaluation suites built on lm-evaluation-harness, offline.

    A directory gets its own engine on loopback (vLLM when installed, else
    transformers); its scores are written next to it, DIR/eval/<suite>.json. A
    served model is scored through its server (--url). Requests run
    --concurrency at a time.

    Example: realign eval merged/ --text news=news.txt
    """
    require("eval", "eval")
    from app.evals.runner import evaluate_model

    texts = parse_texts(text or [])
    spec = EvalSpec(
        suites=_suites(suite or [], bool(texts), bool(task)),
        texts={name: str(Path(path).resolve()) for name, path in texts.items()},
        tasks_dir=str(tasks_dir.resolve()) if tasks_dir else None,
        tasks=tuple(task or ()),
        limit=limit,
        max_tokens=max_tokens,
        concurrency=concurrency,
    )
    if url is None:
        model = str(Path(model).resolve())
    target = EvalTarget(
        model=model,
        base_url=url,
        model_dir=str(model_dir.resolve()) if model_dir else None,
        chat_template_from=str(chat_template_from.resolve()) if chat_template_from else None,
        api_key=api_key,
    )
    scores = evaluate_model(target, spec, progress=_printer(quiet))
    result = ModelEval(label=Path(model).name if url is None else model, model=model, suites=scores)
    if save:
        _save(target.weights, scores, target, spec)
    if as_json:
        out.print_json(result.model_dump_json())
    else:
        out.print(_table(result))
