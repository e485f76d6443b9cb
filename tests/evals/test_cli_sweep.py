"""``realign sweep``, run as users run it (a real subprocess, the embedded job service, the
real engine): the pick published and copied out, every score in the results and the page,
and a sweep that no alpha passes failing with exit status 3 and its scores kept."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from app.demo.tiny import TinyTriple
from app.evals.models import EvalReport
from app.jobs.models import JobRecord, JobStatus
from app.jobs.records import JobRecords
from app.jobs.sqlite_kv import SqliteKV
from app.residuals.manifest import read_merge_manifest
from tests.evals.page import Page

ROOT = Path(__file__).resolve().parents[2]
# cheap suites; the alphas of the failing sweep are among the first one's, so its scores
# come from the eval cache of the shared store
CHEAP = ["--maximize", "format", "--suite", "format", "--limit", "4", "--max-tokens", "16"]


def realign(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("REALIGN_")}
    env |= {"PYTHONPATH": str(ROOT), "COLUMNS": "200"}
    return subprocess.run(
        [sys.executable, "-m", "app.cli", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A working directory whose store the module's sweeps share."""
    return tmp_path_factory.mktemp("sweep_cli")


def _inputs(triple: TinyTriple) -> list[str]:
    return ["-b", str(triple.base), "-i", str(triple.instruct), "-t", str(triple.new_base)]


def _job(work: Path, name: str) -> JobRecord:
    records = JobRecords(SqliteKV(work / "store" / ".jobs.sqlite"))
    (rec,) = [r for r in records.page(None, None, 0, 100)[0] if r.spec.name == name]
    return rec


def _ratio(report: EvalReport, label: str) -> float:
    by_label = {m.label: m for m in report.models}
    ppl = [by_label[x].suites["perplexity"].metrics["ppl_general"] for x in (label, "target")]
    return ppl[0] / ppl[1]


@pytest.mark.slow
def test_sweep_publishes_the_pick_and_writes_its_results(
    work: Path, llama_triple: TinyTriple
) -> None:
    done = realign(
        work, "sweep", *_inputs(llama_triple), "--alphas=0.5,-10,10", *CHEAP,
        "--perplexity-limit", "2", "--compare", "instruct", "--store", "store",
        "--name", "swept-cli", "--out", "picked", "--report", "sweep.html",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "evaluating" in done.stderr and "sweep picked" in done.stderr  # progress lines
    # the pick's copy, printed last
    assert done.stdout.strip().splitlines()[-1] == "picked"

    report = EvalReport.model_validate_json((work / "sweep.json").read_text())
    labels = {m.label for m in report.models}
    assert labels == {"target", "alpha=0.5", "alpha=-10", "alpha=10", "instruct"}
    assert all({"format", "perplexity"} <= set(m.suites) for m in report.models)
    # the objective, applied to the scores: within 2x the target's perplexity, best format
    alphas = [m for m in report.models if m.alpha is not None]
    fits = [m for m in alphas if _ratio(report, m.label) <= 2]
    assert set(report.rejected) == {m.label for m in alphas} - {m.label for m in fits}
    assert all("x the target's (limit 2x)" in why for why in report.rejected.values())
    best = max(fits, key=lambda m: (m.suites["format"].metrics["format"], -abs(m.alpha - 1)))
    assert report.chosen == best.label and "maximise format subject to" in report.objective

    # the table: a row per model with its verdict, then why each left-out alpha was
    rows = {line.split()[0]: line for line in done.stdout.splitlines() if line.strip()}
    assert rows[best.label].rstrip().endswith("chosen")
    for label, why in report.rejected.items():
        assert rows[label].rstrip().endswith("left out")
        assert f"left out {label}: {why}" in done.stdout
    assert f"chosen: {best.label}" in done.stdout

    # the job POST /merge runs: recorded in the store, the pick merged and registered
    job = _job(work, "swept-cli")
    assert job.status is JobStatus.succeeded and job.spec.sweep is not None
    assert job.spec.alpha == best.alpha and job.result is not None
    assert job.result.evaluation == report
    models = JobRecords(SqliteKV(work / "store" / ".jobs.sqlite")).models()
    assert [m.job_id for m in models if m.id == "swept-cli"] == [job.id]
    copied = read_merge_manifest(work / "picked")
    assert copied.alpha == best.alpha
    assert copied == read_merge_manifest(work / job.result.output)  # the store is relative

    page = Page((work / "sweep.html").read_text())
    assert page.rows[best.label].classes == {"chosen"}
    assert all(page.rows[label].classes == {"rejected"} for label in report.rejected)
    assert {"plot-alpha-score", "plot-alpha-ppl"} <= set(page.figures)


@pytest.mark.slow
def test_sweep_that_no_alpha_passes_exits_3_with_every_score(
    work: Path, llama_triple: TinyTriple
) -> None:
    # an alpha of 10 in either direction is far from the target: its perplexity is
    # several times the target's (the previous test's sweep scored them)
    done = realign(
        work, "sweep", *_inputs(llama_triple), "--alphas=-10,10", *CHEAP,
        "--perplexity-limit", "1.5", "--store", "store", "--name", "none-cli",
        "--results", "none.json", "--report", "none.html", "--quiet",
    )  # fmt: skip
    assert done.returncode == 3, done.stderr
    assert "error: job mrg_" in done.stderr
    assert "no alpha of the sweep meets the objective" in done.stderr
    assert "alpha=-10: ppl_general" in done.stderr and "sweep smaller alphas" in done.stderr
    assert "evaluating" not in done.stderr  # --quiet: no progress lines
    assert "chosen: none" in done.stdout and "picked" not in done.stdout

    report = EvalReport.model_validate_json((work / "none.json").read_text())
    assert report.chosen is None and set(report.rejected) == {"alpha=-10", "alpha=10"}
    assert {m.label for m in report.models} == {"target", "alpha=-10", "alpha=10"}
    for label, why in report.rejected.items():
        assert _ratio(report, label) > 1.5
        assert why.startswith("ppl_general ") and why.endswith("x the target's (limit 1.5x)")

    job = _job(work, "none-cli")
    assert job.status is JobStatus.failed and job.error is not None
    assert job.error.code == "no_alpha_meets_objective"
    assert job.result is not None and job.result.evaluation == report
    assert job.result.merged_key == "" and job.result.model_id == ""
    models = JobRecords(SqliteKV(work / "store" / ".jobs.sqlite")).models()
    assert "none-cli" not in {m.id for m in models}  # nothing registered

    page = Page((work / "none.html").read_text())
    assert page.text["chosen"].startswith("none")
    assert "alpha=10" in page.text["rejected"] and "1.5x" in page.text["rejected"]
    assert page.rows["alpha=-10"].classes == page.rows["alpha=10"].classes == {"rejected"}


def test_sweep_refuses_bad_options_before_any_work(tmp_path: Path) -> None:
    (tmp_path / "taken").mkdir()
    cases = {
        ("--alphas", "0.5"): "--alphas:",
        ("--alphas", "0.5,x"): "give numbers separated by commas",
        ("--alphas", "0.5,0.5"): "appears twice",
        ("--perplexity-limit", "1"): "--perplexity-limit:",
        ("--out", "taken"): "already exists",
    }
    for args, message in cases.items():
        done = realign(tmp_path, "sweep", "-b", "b", "-i", "i", "-t", "t", *args)
        assert done.returncode == 2, (args, done.stderr)
        assert message in done.stderr, (args, done.stderr)
    assert {p.name for p in tmp_path.iterdir()} == {"taken"}  # no store, no results
