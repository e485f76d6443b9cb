"""What ``realign sweep`` shows: a line per step of the job, then every model's scores,
why each alpha left out was left out, and the pick."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from rich import box
from rich.table import Table

from app.evals.columns import Column, columns, headline

if TYPE_CHECKING:
    from collections.abc import Callable

    from rich.console import Console

    from app.evals.models import EvalReport
    from app.jobs.models import JobEvent

NO_ALPHA_EXIT = 3  # the exit status when no alpha met the objective


def printer(quiet: bool, console: Console) -> Callable[[JobEvent], None]:
    """Each event of the job as a line with the seconds since the start; merge progress
    once per tenth of a stage."""
    start = time.monotonic()
    shown: dict[str, int] = {}

    def show(event: JobEvent) -> None:
        if quiet:
            return
        if event.kind == "progress":
            if event.progress is None:
                return
            stage = event.stage.value if event.stage else "progress"
            tenth = int(event.progress.percent // 10)
            if shown.get(stage, -1) >= tenth:
                return
            shown[stage] = tenth
            line = f"{stage} {event.progress.percent:.0f}%"
        elif event.status.terminal:  # the outcome is printed once the job ended
            return
        elif event.message:
            line = event.message
        else:
            return
        stamp = f"[{time.monotonic() - start:6.1f}s] "
        console.print(stamp + line, highlight=False, soft_wrap=True, markup=False)

    return show


def shown_columns(report: EvalReport) -> list[Column]:
    """The headline metric of each suite, and every perplexity (what the objective reads)."""
    heads = {name: headline(score) for m in report.models for name, score in m.suites.items()}
    return [c for c in columns(report) if c.metric.startswith("ppl_") or heads[c.suite] == c.metric]


def table(report: EvalReport) -> Table:
    """One row per model: its alpha, the shown metrics and the objective's verdict."""
    cols = shown_columns(report)
    grid = Table(box=box.SIMPLE_HEAD, title="alpha sweep", title_justify="left")
    grid.add_column("model", no_wrap=True)
    grid.add_column("alpha", justify="right")
    for c in cols:
        arrow = "" if c.higher is None else " ↑" if c.higher else " ↓"
        grid.add_column(c.metric + arrow, justify="right")
    grid.add_column("verdict", no_wrap=True)
    for m in report.models:
        values = []
        for c in cols:
            score = m.suites.get(c.suite)
            v = score.metrics.get(c.metric) if score else None
            values.append("" if v is None else f"{v:.4g}")
        verdict = "chosen" if m.label == report.chosen else ""
        verdict = "left out" if m.label in report.rejected else verdict
        alpha = "" if m.alpha is None else f"{m.alpha:g}"
        grid.add_row(m.label, alpha, *values, verdict)
    return grid


def outcome_lines(report: EvalReport) -> list[str]:
    """The objective, each alpha left out and why, and the pick (or none)."""
    lines = [f"objective: {report.objective or 'not stated'}"]
    lines += [f"left out {label}: {why}" for label, why in report.rejected.items()]
    lines.append(f"chosen: {report.chosen or 'none (no alpha met the objective)'}")
    return lines
