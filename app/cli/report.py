"""``realign report``: an evaluation's results (JSON) as a self-contained HTML page."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from app.cli.common import app, err, fail, friendly, out

if TYPE_CHECKING:
    from app.evals.models import EvalReport


@app.command()
@friendly
def report(
    results: Annotated[
        Path,
        typer.Argument(
            help="An evaluation's results: the report JSON of an eval job or alpha sweep "
            "(an object with spec and models), or the job itself as GET /v1/evals/ID "
            "returns it (the report is its result.evaluation)."
        ),
    ],
    output: Annotated[
        Path | None,
        typer.Option(
            "--out",
            "-o",
            help="Where to write the page ('-': standard output). "
            "Default: the results file with the suffix .html.",
            show_default=False,
        ),
    ] = None,
) -> None:
    """Render an evaluation as one HTML page that needs nothing else to open: what was
    run, a table of every metric of every model with the best of each column marked,
    and plots (scores per model; for an alpha sweep, score and perplexity against alpha with
    the reference models as dashed lines and the chosen alpha marked). Prints the page's
    path last.

    Example: realign report results.json -o report.html
    """
    from app.evals.report import render_report

    page = render_report(_load(results))
    if str(output) == "-":
        out.file.write(page)
        return
    target = output if output is not None else results.with_suffix(".html")
    write_atomic(target, page)
    err.print(f"report of {results} written", highlight=False)
    out.print(str(target), highlight=False, soft_wrap=True)


def _load(path: Path) -> EvalReport:
    """The EvalReport in ``path``: at its top level, or under ``report`` / ``result``."""
    from pydantic import ValidationError

    from app.evals.models import EvalReport

    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise fail(
            f"{path}: not JSON ({exc}) — pass the results file of an evaluation", 2
        ) from None
    candidates = [data, *_nested(data)]
    problem: ValidationError | None = None
    for candidate in candidates:
        try:
            return EvalReport.model_validate(candidate)
        except ValidationError as exc:
            problem = problem or exc
    first = problem.errors()[0] if problem else {"loc": (), "msg": "no report"}
    where = ".".join(str(p) for p in first["loc"]) or "top level"
    raise fail(
        f"{path}: not an evaluation report ({where}: {first['msg']}) — pass the JSON an "
        "eval job or sweep produced (spec, models, ...)",
        2,
    )


def _nested(data: object) -> list[object]:
    """Where a job record keeps its report: ``evaluation``, or ``result.evaluation``."""
    if not isinstance(data, dict):
        return []
    result = data.get("result")
    inner = result.get("evaluation") if isinstance(result, dict) else None
    return [x for x in (data.get("evaluation"), inner) if isinstance(x, dict)]


def write_atomic(target: Path, page: str) -> None:
    """Write atomically: a reader never sees half a page."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(page, encoding="utf-8")
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
