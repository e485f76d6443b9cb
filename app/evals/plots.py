"""The plots of an evaluation report, drawn with matplotlib on its Agg canvas (never a
display) and embedded in the page as PNG data, so the page needs nothing else."""

from __future__ import annotations

import base64
import io
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from app.core.errors import MissingExtraError, install_hint
from app.evals.columns import Column, chosen_model, direction, headline, suite_order, value
from app.evals.models import EvalReport, ModelEval, SuiteName

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

# matplotlib's default cycle ("tab10"): a model or a series keeps its colour everywhere.
COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd",
          "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf")  # fmt: skip
# One dash pattern per reference model (base, instruct, target, ...).
DASHES: tuple[Any, ...] = ((0, (6, 3)), (0, (2, 2)), (0, (8, 2, 2, 2)), (0, (4, 1, 1, 1)))
DPI = 100
ALPHA = "\N{GREEK SMALL LETTER ALPHA}"


@dataclass(frozen=True)
class Plot:
    """One embedded plot: its element id, caption, alt text and PNG (base64)."""

    id: str
    caption: str
    alt: str
    png: str


def plots(report: EvalReport) -> list[Plot]:
    """Every plot the report has data for: scores per model, and for a sweep, score
    and perplexity against alpha.

    Args:
        report: The evaluation to draw.

    Returns:
        The plots, in page order (none when no model has a score).

    Raises:
        MissingExtraError: matplotlib is not installed.
    """
    found = [scores_plot(report), alpha_score_plot(report), alpha_ppl_plot(report)]
    return [p for p in found if p is not None]


def scores_plot(report: EvalReport) -> Plot | None:
    """A bar chart per suite of each model's headline metric (the chosen one hatched)."""
    panels = _headlines(report, report.models)
    if not panels:
        return None
    n_models, cols = len(report.models), min(len(panels), 3)
    rows = math.ceil(len(panels) / cols)
    fig = _figure(max(6.0, min(15.0, cols * (1.5 + 0.6 * n_models))), 3.4 * rows)
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax, column in zip(axes, panels, strict=False):
        _bars(ax, report, column)
    for ax in axes[len(panels) :]:
        ax.set_visible(False)
    names = ", ".join(f"{c.suite} ({c.metric})" for c in panels)
    return Plot(
        "plot-scores",
        "Headline score of each model, one panel per suite.",
        f"Bar charts of each model's headline score per suite: {names}.",
        _png(fig),
    )


def alpha_score_plot(report: EvalReport) -> Plot | None:
    """Each generation suite's headline against alpha; references as dashed lines."""
    points = _sweep(report)
    series = [c for c in _headlines(report, points) if c.suite != SuiteName.perplexity.value]
    if not series:
        return None
    fig = _alpha_figure(report, series, "score")
    return Plot(
        "plot-alpha-score",
        f"Headline score against {ALPHA} (dashed: reference models).",
        _alpha_alt(report, "Line chart of headline scores", series),
        _png(fig),
    )


def alpha_ppl_plot(report: EvalReport) -> Plot | None:
    """Each perplexity (``ppl_*``) against alpha; references as dashed lines."""
    suite = SuiteName.perplexity.value
    metrics: list[str] = []
    for m in _sweep(report):
        score = m.suites.get(suite)
        metrics += [k for k in (score.metrics if score else ()) if k.startswith("ppl_")]
    series = [Column(suite, k, False) for k in dict.fromkeys(metrics)]
    if not series:
        return None
    fig = _alpha_figure(report, series, "perplexity (lower is better)")
    return Plot(
        "plot-alpha-ppl",
        f"Perplexity against {ALPHA} (dashed: reference models).",
        _alpha_alt(report, "Line chart of perplexities", series),
        _png(fig),
    )


def text(s: str, limit: int = 28) -> str:
    """A user's string as matplotlib should draw it: shortened, and literal (a ``$``
    would otherwise start mathtext, which fails on an odd count)."""
    s = s if len(s) <= limit else s[: limit - 1] + "…"
    return s.replace("\\", "\\\\").replace("$", r"\$")


def _headlines(report: EvalReport, models: list[ModelEval] | tuple[ModelEval, ...]) -> list[Column]:
    found = []
    for suite in suite_order(report):
        score = next((m.suites[suite] for m in models if suite in m.suites), None)
        metric = headline(score) if score else None
        if score and metric:
            found.append(Column(suite, metric, direction(score, metric)))
    return found


def _sweep(report: EvalReport) -> list[ModelEval]:
    return sorted((m for m in report.models if m.alpha is not None), key=lambda m: m.alpha or 0.0)


def _get(model: ModelEval, column: Column) -> float | None:
    """The model's value in ``column`` when it is a finite number (nothing to draw else)."""
    v = value(model, column)
    return v if v is not None and math.isfinite(v) else None


def _arrow(higher: bool | None) -> str:
    return {True: " ↑", False: " ↓", None: ""}[higher]


def _bars(ax: Axes, report: EvalReport, column: Column) -> None:
    values = [_get(m, column) for m in report.models]
    heights = [0.0 if v is None else v for v in values]
    chosen = [m.label == report.chosen for m in report.models]
    bars = ax.bar(
        range(len(values)), heights,
        color=[COLORS[i % len(COLORS)] for i in range(len(values))],
        edgecolor=["black" if c else "none" for c in chosen],
        linewidth=[2.0 if c else 0.0 for c in chosen],
    )  # fmt: skip
    for bar, is_chosen in zip(bars, chosen, strict=True):
        bar.set_hatch("//" if is_chosen else None)
    ax.bar_label(bars, ["n/a" if v is None else f"{v:.4g}" for v in values],
                 fontsize=8, padding=2)  # fmt: skip
    names = [text(m.label, 18) for m in report.models]
    labels = [("★ " if c else "") + name for name, c in zip(names, chosen, strict=True)]
    tilt = len(values) > 3 or max(len(x) for x in labels) > 10
    ax.set_xticks(range(len(values)), labels, rotation=30 if tilt else 0,
                  ha="right" if tilt else "center", fontsize=8)  # fmt: skip
    ax.set_title(text(f"{column.suite}: {column.metric}", 40) + _arrow(column.higher), fontsize=10)
    ax.margins(y=0.15)
    ax.grid(axis="y", alpha=0.3)


def _alpha_figure(report: EvalReport, series: list[Column], ylabel: str) -> Figure:
    points = _sweep(report)
    refs = [m for m in report.models if m.alpha is None]
    fig = _figure(9.0, 4.6)
    ax = fig.add_subplot()
    for i, column in enumerate(series):
        color = COLORS[i % len(COLORS)]
        xy = [(m.alpha or 0.0, v) for m in points if (v := _get(m, column)) is not None]
        name = text(f"{column.suite}: {column.metric}", 40) + _arrow(column.higher)
        ax.plot([x for x, _ in xy], [y for _, y in xy], marker="o", color=color, label=name)
        for j, ref in enumerate(refs):
            if (v := _get(ref, column)) is not None:
                ax.axhline(v, color=color, linestyle=DASHES[j % len(DASHES)], linewidth=1.2,
                           label=f"{text(ref.label, 20)} ({text(column.metric, 20)})")  # fmt: skip
    _mark_chosen(ax, report, series)
    ys = [v for m in (*points, *refs) for c in series if (v := _get(m, c)) is not None]
    if ys and min(ys) > 0 and max(ys) / min(ys) > 20:
        ax.set_yscale("log")
    ax.set_xlabel(f"{ALPHA} (residual scale)")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return fig


def _mark_chosen(ax: Axes, report: EvalReport, series: list[Column]) -> None:
    chosen = chosen_model(report)
    if chosen is None or chosen.alpha is None:
        return
    ax.axvline(chosen.alpha, color="black", linestyle=":", linewidth=1.5,
               label=f"chosen: {text(chosen.label, 20)} ({ALPHA}={chosen.alpha:g})")  # fmt: skip
    for column in series:
        if (v := _get(chosen, column)) is not None:
            ax.plot([chosen.alpha], [v], marker="*", markersize=16, color="gold",
                    markeredgecolor="black", linestyle="none")  # fmt: skip


def _alpha_alt(report: EvalReport, what: str, series: list[Column]) -> str:
    alphas = ", ".join(f"{m.alpha:g}" for m in _sweep(report))
    refs = ", ".join(m.label for m in report.models if m.alpha is None) or "none"
    chosen = chosen_model(report)
    pick = f"; chosen: {chosen.label}" if chosen is not None else ""
    names = ", ".join(f"{c.suite} {c.metric}" for c in series)
    return f"{what} ({names}) against {ALPHA} = {alphas}; dashed reference lines: {refs}{pick}."


def _figure(width: float, height: float) -> Figure:
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise MissingExtraError(
            f"the evaluation report needs matplotlib ({exc.name} is not installed): "
            f"{install_hint('eval')}"
        ) from None
    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)  # Agg draws into memory: no display is ever opened
    return fig


def _png(fig: Figure) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", metadata={"Software": None})
    return base64.b64encode(buffer.getvalue()).decode("ascii")
