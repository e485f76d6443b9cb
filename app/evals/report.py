"""An evaluation as one self-contained HTML page: what was run, a table of every metric
of every model (the best of each column marked), and the plots (PNG data, inline).

The page loads nothing: no script, no external style, font or image; its own
Content-Security-Policy allows only inline styles and ``data:`` images, so a label
that escaped escaping still could not run or fetch anything.
"""

from __future__ import annotations

from html import escape
from typing import TYPE_CHECKING

from app.evals.columns import Column, best, chosen_model, columns, is_best, value
from app.evals.models import EvalReport, ModelEval

if TYPE_CHECKING:
    from app.evals.plots import Plot

ALPHA = "\N{GREEK SMALL LETTER ALPHA}"
CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'; base-uri 'none'"
CSS = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 1.5rem auto; max-width: 96rem;
       padding: 0 1rem; color: #1d2330; }
h1 { font-size: 1.5rem; margin-bottom: .25rem; } h2 { font-size: 1.15rem; margin-top: 2rem; }
dl { display: grid; grid-template-columns: max-content 1fr; gap: .2rem 1rem; }
dt { font-weight: 600; } dd { margin: 0; overflow-wrap: anywhere; }
#choice { border-left: 4px solid #c9a100; background: #fff8dc; padding: .5rem 1rem; }
.table-wrap { overflow-x: auto; }
table { border-collapse: collapse; font-variant-numeric: tabular-nums; }
th, td { border: 1px solid #d5d9e0; padding: .3rem .55rem; text-align: left; }
thead th { background: #eef1f5; } td.num { text-align: right; }
td.best { background: #d7f5dd; font-weight: 700; } td.missing { background: #f7f7f7; }
tr.rejected th, tr.rejected td { color: #8a8f99; }
tr.chosen th, tr.chosen td { border-top: 2px solid #c9a100; border-bottom: 2px solid #c9a100; }
.badge { background: #c9a100; color: #fff; border-radius: .6rem; padding: 0 .45rem;
         font-size: .75rem; margin-left: .3rem; }
code { font-size: .85em; overflow-wrap: anywhere; } td.model { min-width: 8rem; }
td.key code { white-space: nowrap; }
figure { margin: 1.5rem 0; } figure img { max-width: 100%; height: auto; display: block; }
figcaption { color: #4a5262; margin-top: .3rem; } .note { color: #4a5262; }
"""


def render_report(report: EvalReport) -> str:
    """Render an evaluation as a self-contained HTML page.

    Args:
        report: The evaluation: its spec, each model's suite scores, and the choice
            made by an alpha sweep, if any.

    Returns:
        The page, one string of HTML5 with inline CSS and the plots as PNG data;
        every user-given string (labels, model ids, paths, names) is escaped.

    Raises:
        MissingExtraError: matplotlib (the ``eval`` extra) is not installed.
    """
    from app.evals.plots import plots

    figures = plots(report)
    title = f"Realign evaluation: {len(report.models)} model" + "s" * (len(report.models) != 1)
    body = [
        f"<h1>{escape(title)}</h1>",
        _summary(report),
        _choice(report),
        "<h2>Scores</h2>",
        _table(report),
        "<h2>Plots</h2>",
        *(_figure(p) for p in figures),
    ]
    if not figures:
        body.append('<p class="note">No scores to plot.</p>')
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f'<meta http-equiv="Content-Security-Policy" content="{CSP}">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        '<link rel="icon" href="data:,">\n'
        f"<title>{escape(title)}</title>\n<style>{CSS}</style>\n</head>\n<body>\n"
        + "\n".join(b for b in body if b)
        + "\n</body>\n</html>\n"
    )


def _summary(report: EvalReport) -> str:
    spec = report.spec
    rows = [
        ("Created", report.created.isoformat(timespec="seconds")),
        ("Suites", ", ".join(s.value for s in spec.suites)),
        ("Models", ", ".join(m.label for m in report.models) or "none"),
        ("Examples", f"at most {spec.limit} per suite" if spec.limit else "all of each suite"),
        ("Generation", f"{spec.max_tokens} tokens per reply, {spec.concurrency} in flight"),
    ]
    rows += [(f"Text “{name}”", path) for name, path in spec.texts.items()]
    if spec.tasks_dir or spec.tasks:
        rows.append(("Custom tasks", f"{', '.join(spec.tasks) or 'all'} in {spec.tasks_dir}"))
    items = "".join(f"<dt>{escape(k)}</dt><dd>{escape(v)}</dd>" for k, v in rows)
    return f'<dl id="summary">{items}</dl>'


def _choice(report: EvalReport) -> str:
    if report.chosen is None and report.objective is None:
        return ""
    chosen = chosen_model(report)
    if report.chosen is None:
        pick = "none: no alpha met the objective" if report.rejected else "none"
    elif chosen is None:
        pick = f"{escape(report.chosen)} (not among the evaluated models)"
    else:
        at = "" if chosen.alpha is None else f" ({ALPHA} = {chosen.alpha:g})"
        pick = escape(chosen.label) + at
    objective = escape(report.objective) if report.objective else "not stated"
    return (
        f'<section id="choice"><p><strong>Chosen:</strong> <span id="chosen">{pick}</span></p>'
        f'<p><strong>Objective:</strong> <span id="objective">{objective}</span></p>'
        f"{_rejected(report)}</section>"
    )


def _rejected(report: EvalReport) -> str:
    """Each alpha the objective left out, and why."""
    if not report.rejected:
        return ""
    items = "".join(
        f'<li data-label="{escape(label)}"><strong>{escape(label)}</strong>: {escape(why)}</li>'
        for label, why in report.rejected.items()
    )
    return f'<p><strong>Left out:</strong></p><ul id="rejected">{items}</ul>'


def _table(report: EvalReport) -> str:
    cols = columns(report)
    tops = [best([value(m, c) for m in report.models], c.higher) for c in cols]
    groups: dict[str, int] = {}
    for c in cols:
        groups[c.suite] = groups.get(c.suite, 0) + 1
    head = "".join(
        f'<th scope="colgroup" colspan="{n}">{escape(s)}</th>' for s, n in groups.items()
    )
    fixed = "".join(
        f'<th rowspan="2" scope="col">{h}</th>' for h in ("label", "model", ALPHA, "content key")
    )
    metrics = "".join(_metric_head(c) for c in cols)
    rows = "".join(_row(report, m, cols, tops) for m in report.models)
    legend = (
        '<p class="note">↑ higher is better, ↓ lower is better; the best value of each '
        "column is highlighted; a blank cell: that suite was not run for that model.</p>"
    )
    return (
        f'<div class="table-wrap"><table id="scores"><thead><tr>{fixed}{head}</tr>'
        f"<tr>{metrics}</tr></thead><tbody>{rows}</tbody></table></div>{legend}"
    )


def _metric_head(c: Column) -> str:
    arrow, says = ("", "direction not stated")
    if c.higher is not None:
        arrow, says = ("↑", "higher is better") if c.higher else ("↓", "lower is better")
    return (
        f'<th scope="col" data-suite="{escape(c.suite)}" data-metric="{escape(c.metric)}" '
        f'title="{says}">{escape(c.metric)} <span class="dir">{arrow}</span></th>'
    )


def _row(report: EvalReport, m: ModelEval, cols: list[Column], tops: list[float | None]) -> str:
    chosen = report.chosen is not None and m.label == report.chosen
    badge = '<span class="badge">chosen</span>' if chosen else ""
    key = m.content_key or ""
    cells = [
        f'<th scope="row">{escape(m.label)}{badge}</th>',
        f'<td class="model"><code>{escape(m.model)}</code></td>',
        f'<td class="num">{"" if m.alpha is None else f"{m.alpha:g}"}</td>',
        f'<td class="key"><code title="{escape(key)}">{escape(key[:12])}</code></td>',
    ]
    cells += [_cell(m, c, top) for c, top in zip(cols, tops, strict=True)]
    attrs = ' class="chosen"' if chosen else ""
    if why := report.rejected.get(m.label):
        attrs = f' class="rejected" title="left out: {escape(why)}"'
    return f'<tr data-label="{escape(m.label)}"{attrs}>{"".join(cells)}</tr>'


def _cell(m: ModelEval, c: Column, top: float | None) -> str:
    data = f'data-suite="{escape(c.suite)}" data-metric="{escape(c.metric)}"'
    v = value(m, c)
    if v is None:
        return f'<td class="num missing" {data} title="not evaluated"></td>'
    score = m.suites[c.suite]
    run = f"n={score.n}, {score.seconds:.1f} s"
    if score.requests_per_s is not None:
        run += f", {score.requests_per_s:.1f} requests/s"
    cls = "num best" if is_best(v, top) else "num"
    return f'<td class="{cls}" {data} title="{escape(run)}">{_number(v)}</td>'


def _number(v: float) -> str:
    return f"{v:,.0f}" if abs(v) >= 10_000 else f"{v:.4g}"


def _figure(p: Plot) -> str:
    return (
        f'<figure id="{p.id}"><img src="data:image/png;base64,{p.png}" '
        f'alt="{escape(p.alt)}" title="{escape(p.caption)}">'
        f"<figcaption>{escape(p.caption)}</figcaption></figure>"
    )
