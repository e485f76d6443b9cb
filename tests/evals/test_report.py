"""The HTML report of an evaluation: its table parsed back, and the page in headless
Chromium (plots loaded, laid out, painted; no request leaves the page)."""

from __future__ import annotations

import io
import math
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from PIL import Image

from app.evals.models import EvalReport, EvalSpec, ModelEval, SuiteName, SuiteScore
from app.evals.report import render_report
from tests.evals.browser import Browser
from tests.evals.page import Page
from tests.evals.samples import ALPHAS, OBJECTIVE, comparison, model, score, sweep

EVIL = '<script>document.title="owned"</script><img src=x onerror=alert(1)>'


def best(page: Page, suite: str, metric: str) -> set[str]:
    return {k for k, r in page.rows.items() if "best" in r.cells[(suite, metric)].classes}


def test_comparison_table_has_every_metric_the_best_marked_and_blanks() -> None:
    page = Page(render_report(comparison()))
    assert [(s, m) for s, m, _ in page.headers] == [
        ("format", "format"), ("format", "stop_rate"), ("format", "open_rate"),
        ("ifeval-lite", "prompt_strict"), ("ifeval-lite", "instruction_strict"),
        ("perplexity", "ppl_general"), ("perplexity", "ppl_news"),
    ]  # fmt: skip
    arrows = {m: text.split()[-1] for _, m, text in page.headers}
    assert arrows["format"] == arrows["prompt_strict"] == "↑"
    assert arrows["ppl_general"] == arrows["ppl_news"] == "↓"
    assert list(page.rows) == ["base", "instruct", "target", "merge"]
    instruct = page.rows["instruct"]
    assert instruct.fixed == ["/models/instruct", "", "1" * 12]  # model, no alpha, key
    assert instruct.cells[("format", "format")].text == "0.95"
    assert best(page, "format", "format") == {"instruct"}
    assert best(page, "ifeval-lite", "prompt_strict") == {"instruct", "merge"}  # a tie
    assert best(page, "perplexity", "ppl_news") == {"target"}  # lower is better
    merge = page.rows["merge"].cells[("perplexity", "ppl_general")]
    assert merge.text == "" and "missing" in merge.classes
    assert list(page.figures) == ["plot-scores"]  # no alpha: no sweep plots
    assert "choice" not in page.text
    assert "at most 24 per suite" in page.text["summary"]
    assert "/data/news.txt" in page.text["summary"]


def test_sweep_has_three_plots_and_states_and_marks_the_choice() -> None:
    page = Page(render_report(sweep()))
    assert list(page.figures) == ["plot-scores", "plot-alpha-score", "plot-alpha-ppl"]
    for img in page.figures.values():
        assert img["src"].startswith("data:image/png;base64,") and len(img["src"]) > 5000
    alt = page.figures["plot-alpha-score"]["alt"]
    assert "0.25, 0.5, 0.75, 1" in alt and "base, instruct, target" in alt
    assert "prompt_strict" in alt and "ppl_news" in page.figures["plot-alpha-ppl"]["alt"]
    assert page.text["chosen"] == "alpha=0.75 (\N{GREEK SMALL LETTER ALPHA} = 0.75)"
    assert page.text["objective"] == OBJECTIVE
    assert page.rows["alpha=0.75"].classes == {"chosen"}
    assert [r.fixed[1] for r in page.rows.values()] == ["", "", "", *(f"{a:g}" for a in ALPHAS)]


def test_sweep_that_no_alpha_passed_says_so_and_why_for_each() -> None:
    why = {"alpha=0.75": "ppl_news 1.9x the target's (limit 1.05x)", "alpha=1": "<b>x</b>"}
    failed = sweep().model_copy(update={"chosen": None, "rejected": why})
    page = Page(render_report(failed))
    assert page.text["chosen"] == "none: no alpha met the objective"
    assert page.text["objective"] == OBJECTIVE
    assert page.text["rejected"] == "alpha=0.75: ppl_news 1.9x the target's (limit 1.05x)" + (
        "alpha=1: <b>x</b>"  # text, not markup
    )
    assert "b" not in page.tags
    assert {label for label, row in page.rows.items() if row.classes} == set(why)
    assert all(page.rows[label].classes == {"rejected"} for label in why)
    # every score is still drawn; no pick is marked
    assert list(page.figures) == ["plot-scores", "plot-alpha-score", "plot-alpha-ppl"]


def test_user_strings_are_escaped() -> None:
    report = comparison()
    evil_model = model(EVIL, 0.5, 0.5, (10.0, 10.0), key='"><b>key')
    evil_model = evil_model.model_copy(update={"model": f"/tmp/{EVIL}"})
    report = report.model_copy(
        update={
            "models": (*report.models, evil_model),
            # names are checked on input; the page escapes them whatever a record holds
            "spec": EvalSpec.model_construct(texts={"<news>": f"/data/{EVIL}"}),
            "objective": f"max </span>{EVIL}",
            "chosen": EVIL,
        }
    )
    html = render_report(report)
    page = Page(html)
    assert "script" not in page.tags and page.tags.count("img") == len(page.figures)
    assert all(u.startswith("data:") for u in page.urls)
    assert page.rows[EVIL].label == EVIL  # shown as the text it is
    assert page.rows[EVIL].fixed[0] == f"/tmp/{EVIL}"
    assert page.rows[EVIL].classes == {"chosen"}
    assert page.text["objective"] == f"max </span>{EVIL}"
    assert f"/data/{EVIL}" in page.text["summary"]


def test_one_model_and_labels_matplotlib_would_misread() -> None:
    # `$` starts mathtext in matplotlib (an odd count fails); `\` escapes there.
    only = model("price $5 \\ $", 0.9, None, None)
    page = Page(render_report(EvalReport(spec=EvalSpec(), models=(only,))))
    assert list(page.rows) == ["price $5 \\ $"]
    assert not best(page, "format", "format")  # nothing to compare with
    assert list(page.figures) == ["plot-scores"]
    assert page.text["scores"]  # the table is there


def test_no_scores_no_plots() -> None:
    empty = ModelEval(label="merge", model="m")
    page = Page(render_report(EvalReport(spec=EvalSpec(), models=(empty,))))
    assert page.figures == {} and page.headers == []
    assert list(page.rows) == ["merge"]


def test_custom_suite_direction_as_stated_else_no_best() -> None:
    def custom(v: float, higher: dict[str, bool]) -> dict[str, SuiteScore]:
        s = SuiteScore(suite="custom", metrics={"loss": v, "acc": v}, n=3, seconds=1.0,
                       higher_is_better=higher)  # fmt: skip
        return {"custom": s}

    models = (
        ModelEval(label="a", model="a", suites=custom(0.2, {"loss": False})),
        ModelEval(label="b", model="b", suites=custom(0.4, {"loss": False})),
        ModelEval(label="c", model="c", suites=custom(math.nan, {"loss": False})),
    )
    page = Page(render_report(EvalReport(spec=EvalSpec(suites=(SuiteName.custom,)), models=models)))
    assert best(page, "custom", "loss") == {"a"}  # lower is better, as stated; nan skipped
    assert best(page, "custom", "acc") == set()  # unknown direction: no winner
    assert page.rows["c"].cells[("custom", "loss")].text == ""  # not finite: not scored
    heads = {m: text for _, m, text in page.headers}
    assert heads["loss"].strip().endswith("↓") and heads["acc"].strip() == "acc"


def test_spec_suite_order_then_others() -> None:
    suites = {"custom": score("custom", acc=1.0), "format": score("format", format=1.0)}
    m = ModelEval(label="x", model="x", suites=suites)
    page = Page(
        render_report(EvalReport(spec=EvalSpec(suites=(SuiteName.chat_format,)), models=(m,)))
    )
    assert [s for s, _, _ in page.headers] == ["format", "custom"]


def test_renders_at_once_from_threads_give_the_same_page() -> None:
    # The API renders in its thread pool: matplotlib figures there share no state.
    report = comparison()
    alone = render_report(report)
    with ThreadPoolExecutor(4) as pool:
        pages = list(pool.map(lambda _: render_report(report), range(4)))
    assert pages == [alone] * 4


# In the browser ---------------------------------------------------------------------

FIGURES = """[...document.querySelectorAll("figure")].map((fig) => {
  const img = fig.querySelector("img"), r = img.getBoundingClientRect(),
        s = getComputedStyle(img), f = getComputedStyle(fig);
  return {id: fig.id, loaded: img.complete && img.naturalWidth > 0,
          natural: [img.naturalWidth, img.naturalHeight],
          x: r.x + scrollX, y: r.y + scrollY, width: r.width, height: r.height,
          shown: s.display !== "none" && s.visibility === "visible" && f.display !== "none"};
})"""


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Browser]:
    b = Browser(tmp_path / "profile")
    yield b
    b.close()


def show(browser: Browser, tmp_path: Path, report: EvalReport) -> Path:
    path = tmp_path / "report.html"
    path.write_text(render_report(report), encoding="utf-8")
    browser.open(path.as_uri())
    return path


def painted(png: bytes) -> tuple[int, float]:
    """Distinct colours and the fraction of pixels that are not white."""
    image = Image.open(io.BytesIO(png)).convert("RGB")
    total = image.width * image.height
    counts = {colour: n for n, colour in image.getcolors(maxcolors=total) or []}
    return len(counts), 1 - counts.get((255, 255, 255), 0) / total


@pytest.mark.slow
def test_sweep_plots_load_lay_out_and_paint_in_chromium(browser: Browser, tmp_path: Path) -> None:
    path = show(browser, tmp_path, sweep())
    figures = browser.evaluate(FIGURES)
    assert [f["id"] for f in figures] == ["plot-scores", "plot-alpha-score", "plot-alpha-ppl"]
    for f in figures:
        assert f["loaded"] and f["shown"], f
        assert min(f["natural"]) > 200 and f["width"] > 400 and f["height"] > 200, f
        colours, ink = painted(browser.screenshot(f))
        assert colours > 30 and ink > 0.03, (f["id"], colours, ink)
    # The stylesheet applied: the best value of a column has its own background.
    best_bg = browser.evaluate(
        'getComputedStyle(document.querySelector("td.best")).backgroundColor'
    )
    assert best_bg == "rgb(215, 245, 221)"
    others = [u for u in browser.requests() if not u.startswith("data:")]
    assert others == [path.as_uri()]  # nothing but the page itself


@pytest.mark.slow
def test_hostile_label_is_text_in_chromium(browser: Browser, tmp_path: Path) -> None:
    report = comparison()
    report = report.model_copy(update={"models": (*report.models, model(EVIL, 0.5, 0.5, None))})
    show(browser, tmp_path, report)
    assert browser.evaluate("document.title") == "Realign evaluation: 5 models"
    assert browser.evaluate("document.scripts.length") == 0
    labels = browser.evaluate('[...document.querySelectorAll("tbody th")].map(t => t.textContent)')
    assert labels[-1] == EVIL
    assert [u for u in browser.requests() if not u.startswith(("data:", "file:"))] == []


@pytest.mark.slow
def test_the_request_check_sees_a_page_that_fetches(browser: Browser, tmp_path: Path) -> None:
    # The check above would pass for a page that loaded nothing: show it catches fetches.
    path = tmp_path / "fetches.html"
    path.write_text(
        '<link rel="stylesheet" href="https://cdn.example.com/x.css">'
        '<img src="http://example.com/plot.png">',
        encoding="utf-8",
    )
    browser.open(path.as_uri())
    asked = browser.requests()
    assert "https://cdn.example.com/x.css" in asked and "http://example.com/plot.png" in asked
