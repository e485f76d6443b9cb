"""``realign sweep``: merge at several alphas, evaluate each, publish the objective's pick.

It runs the job ``POST /merge`` queues for ``"alpha": {"sweep": [...]}``, in this process:
the embedded job service (the store's SQLite job records and an in-process worker), so it
needs no Redis and no server, and shares the eval score cache with a ``realign serve``
on the same store.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from app.cli.common import DType, Store, Target, app, err, fail, friendly, out
from app.cli.evals import Concurrency, Limit, MaxTokens, parse_texts
from app.cli.report import write_atomic
from app.cli.sweepview import NO_ALPHA_EXIT, outcome_lines, printer, table
from app.core.settings import get_settings
from app.evals.models import SuiteName

if TYPE_CHECKING:
    from app.core.settings import Settings
    from app.evals.models import EvalReport
    from app.jobs.models import JobRecord
    from app.store.base import Store as StoreT


class Maximize(StrEnum):
    chat_format = "format"
    ifeval_lite = "ifeval-lite"


class Reference(StrEnum):
    base = "base"
    instruct = "instruct"


DEFAULT_SUITES = (SuiteName.chat_format, SuiteName.ifeval_lite, SuiteName.perplexity)


@app.command()
@friendly
def sweep(
    target: Target,
    base: Annotated[
        str | None, typer.Option("--base", "-b", help="Base model: directory or hf:org/name@rev.")
    ] = None,
    instruct: Annotated[
        str | None, typer.Option("--instruct", "-i", help="Instruct model tuned from --base.")
    ] = None,
    residual: Annotated[
        str | None,
        typer.Option(
            "--residual", "-r", help="A stored residual key (or prefix), instead of -b/-i."
        ),
    ] = None,
    alphas: Annotated[
        str, typer.Option("--alphas", help="The alphas to try, comma-separated (2 to 16).")
    ] = "0.25,0.5,0.75,1.0",
    maximize: Annotated[
        Maximize, typer.Option("--maximize", help="The suite whose headline score is maximised.")
    ] = Maximize.ifeval_lite,
    perplexity_limit: Annotated[
        float,
        typer.Option(
            "--perplexity-limit",
            help="An alpha qualifies when its perplexity is at most this factor of the "
            "target's (on the --text sets when given, else the general set).",
        ),
    ] = 1.05,
    text: Annotated[
        list[str] | None,
        typer.Option("--text", help="Domain text for perplexity: NAME=FILE (repeatable)."),
    ] = None,
    suite: Annotated[
        list[SuiteName] | None,
        typer.Option(
            "--suite",
            "-s",
            help="Suites to run (repeatable; default format, ifeval-lite, perplexity); "
            "the objective's suite and perplexity are always added.",
        ),
    ] = None,
    compare: Annotated[
        list[Reference] | None,
        typer.Option("--compare", help="Also evaluate this input, for reference (repeatable)."),
    ] = None,
    limit: Limit = None,
    max_tokens: MaxTokens = 128,
    concurrency: Concurrency = 8,
    name: Annotated[
        str | None, typer.Option("--name", help="Model id of the pick (default realign-<key>).")
    ] = None,
    dtype: DType = None,
    store: Store = None,
    device: Annotated[
        str | None, typer.Option("--device", help="cpu or cuda[:N] (default $REALIGN_DEVICE).")
    ] = None,
    force: Annotated[
        bool, typer.Option("--force", help="Merge past a failed lineage check.")
    ] = False,
    out_dir: Annotated[
        Path | None,
        typer.Option("--out", "-o", help="Also copy the pick here (must not exist)."),
    ] = None,
    results: Annotated[
        Path, typer.Option("--results", help="Where the sweep's results (JSON) go.")
    ] = Path("sweep.json"),
    report: Annotated[
        Path | None, typer.Option("--report", help="Also write the HTML report here.")
    ] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress lines.")] = False,
) -> None:
    """Merge at each alpha, evaluate each beside the target, publish the best by a stated
    objective: maximise --maximize's headline score over the alphas whose perplexity stays
    within --perplexity-limit times the target's (ties go to the alpha nearest 1).

    Each alpha is merged inside the evaluation engine as it loads (no checkpoint per
    alpha); only the pick is written, to the store (and to --out). This is the job
    POST /merge runs for "alpha": {"sweep": [...]}, run here by the embedded job service:
    no server or Redis needed. Prints a progress line per step, then every model's
    scores, why each alpha left out was left out, and the pick's directory last; the
    results (JSON, for `realign report`) go to --results, the page to --report.

    Exit status: 0 with a pick; 3 when no alpha meets the objective (the scores are still
    written); 1 for other failures; 130 when interrupted.

    Example: realign sweep -b base/ -i instruct/ -t new_base/ --alphas 0.5,0.75,1
    --text news=news.txt --report sweep.html
    """
    from app.evals.choose import AlphaSweep
    from app.evals.models import EvalRequest
    from app.jobs.follow import LocalJobs
    from app.jobs.models import MergeSpec

    if out_dir is not None and out_dir.exists():
        raise fail(f"--out {out_dir}: already exists; choose a new directory", 2)
    texts = parse_texts(text or [])
    settings = _settings(store, device, [base, instruct, target, *texts.values()])
    with _options():
        objective = AlphaSweep(
            sweep=_alphas(alphas),
            maximize=SuiteName(maximize.value),
            perplexity_limit=perplexity_limit,
        )
        request = EvalRequest.model_validate(
            {
                "suites": tuple(suite or DEFAULT_SUITES),
                "texts": {k: str(Path(v).resolve()) for k, v in texts.items()},
                "compare": tuple(c.value for c in compare or ()),
                "limit": limit,
                "max_tokens": max_tokens,
                "concurrency": concurrency,
            }
        )
        refs = dict(target=_local(target), base=_local(base), instruct=_local(instruct))
        spec = MergeSpec.model_validate(  # dtype is checked here, as the API checks it
            refs | dict(residual=residual, dtype=dtype, name=name, force=force)
            | dict(sweep=objective, eval=request)
        )  # fmt: skip
    if not logging.getLogger().isEnabledFor(logging.DEBUG):  # -v shows the worker's log
        logging.getLogger("app.jobs").setLevel(logging.WARNING)  # the events say it all
    with LocalJobs(settings) as jobs:
        rec, created = jobs.submit(spec)
        how = "submitted" if created else "already running in this store: following"
        err.print(f"job {rec.id} {how}", highlight=False)
        final = jobs.wait(rec.id, printer(quiet, err))
        _finish(final, jobs.service.store, out_dir, results, report)


def _settings(store: Path | None, device: str | None, inputs: list[str | None]) -> Settings:
    """This process's settings, with the given store and device; the local inputs join
    the allowed roots (the command reads what its user names, as `realign merge` does)."""
    settings = get_settings()
    update: dict[str, object] = {}
    if store is not None:
        update["models_cache_dir"] = store
    if device is not None:
        update["device"] = device
    roots = list(settings.allowed_roots or [store or settings.models_cache_dir])
    roots += [Path(os.path.realpath(p)) for p in inputs if p and Path(p).exists()]
    return settings.model_copy(update=update | {"allowed_roots": roots})


@contextmanager
def _options() -> Iterator[None]:
    """A value pydantic refuses, named by its option, on one line."""
    from pydantic import ValidationError

    try:
        yield
    except ValidationError as exc:
        first = exc.errors()[0]
        where = [str(p) for p in first["loc"]]
        option = next((_OPTIONS[p] for p in where if p in _OPTIONS), ".".join(where))
        raise fail(f"{option}: {first['msg']}", 2) from None


_OPTIONS = {"sweep": "--alphas", "perplexity_limit": "--perplexity-limit", "name": "--name",
            "dtype": "--pack", "limit": "--limit", "max_tokens": "--max-tokens"}  # fmt: skip


def _alphas(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(a) for a in text.split(",") if a.strip())
    except ValueError:
        raise fail(
            f"--alphas {text}: give numbers separated by commas, e.g. 0.5,0.75,1", 2
        ) from None


def _local(ref: str | None) -> str | None:
    """A local directory as an absolute path (the job may outlive this directory)."""
    return str(Path(ref).resolve()) if ref and Path(ref).exists() else ref


def _finish(
    rec: JobRecord, store: StoreT, out_dir: Path | None, results: Path, page: Path | None
) -> None:
    """Write what the job measured, print it, and end as the job ended."""
    evaluation = rec.result.evaluation if rec.result else None
    if evaluation is not None:
        _write(evaluation, results, page)
        out.print(table(evaluation))
        for line in outcome_lines(evaluation):
            out.print(line, highlight=False, soft_wrap=True, markup=False)
    if rec.error is not None:
        code = {"no_alpha_meets_objective": NO_ALPHA_EXIT, "cancelled": 130}
        raise fail(f"job {rec.id}: {rec.error.message}", code.get(rec.error.code, 1))
    assert rec.result is not None
    path = Path(rec.result.output)
    if out_dir is not None:
        path = _copy(store, rec.result.merged_key, out_dir)
    err.print(f"published {rec.result.model_id} at {path}", highlight=False, soft_wrap=True)
    out.print(str(path), highlight=False, soft_wrap=True, markup=False)


def _write(evaluation: EvalReport, results: Path, page: Path | None) -> None:
    write_atomic(results, evaluation.model_dump_json(indent=2) + "\n")
    err.print(f"results in {results}", highlight=False, soft_wrap=True)
    if page is not None:
        from app.evals.report import render_report

        write_atomic(page, render_report(evaluation))
        err.print(f"report in {page}", highlight=False, soft_wrap=True)


def _copy(store: StoreT, key: str, out_dir: Path) -> Path:
    """The published model copied to ``out_dir``, whole or not at all."""
    tmp = out_dir.with_name(f".{out_dir.name}.{os.getpid()}.tmp")
    try:
        with store.using(key, "merged") as path:
            shutil.copytree(path, tmp)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir
