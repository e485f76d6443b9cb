"""``realign report RESULTS.json``, run as users run it (a real subprocess)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.evals.page import Page
from tests.evals.samples import sweep

ROOT = Path(__file__).resolve().parents[2]


def realign(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "app.cli", *args],
        cwd=ROOT,
        env=dict(os.environ),
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_report_writes_the_page_beside_the_results(tmp_path: Path) -> None:
    results = tmp_path / "results.json"
    results.write_text(sweep().model_dump_json(indent=2), encoding="utf-8")
    done = realign("report", str(results))
    assert done.returncode == 0, done.stderr
    page_path = tmp_path / "results.html"
    assert done.stdout.strip().splitlines()[-1] == str(page_path)
    page = Page(page_path.read_text(encoding="utf-8"))
    assert list(page.figures) == ["plot-scores", "plot-alpha-score", "plot-alpha-ppl"]
    assert page.rows["alpha=0.75"].classes == {"chosen"}
    # no temporary file left
    assert {p.name for p in tmp_path.iterdir()} == {"results.json", "results.html"}


def test_report_of_a_job_record_to_out_and_stdout(tmp_path: Path) -> None:
    # GET /v1/evals/{id} returns the job; its report is result.evaluation.
    job = {"id": "j1", "status": "succeeded", "result": {"evaluation": sweep().model_dump()}}
    results = tmp_path / "job.json"
    results.write_text(json.dumps(job, default=str), encoding="utf-8")
    out = tmp_path / "pages" / "sweep.html"
    done = realign("report", str(results), "-o", str(out))
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == str(out)
    assert Page(out.read_text(encoding="utf-8")).text["objective"] == sweep().objective
    piped = realign("report", str(results), "--out", "-")
    assert piped.returncode == 0, piped.stderr
    assert piped.stdout.startswith("<!DOCTYPE html>") and piped.stdout.rstrip().endswith("</html>")


def test_report_refuses_what_is_not_a_report(tmp_path: Path) -> None:
    not_json = tmp_path / "notes.json"
    not_json.write_text("alpha 0.5 looked fine", encoding="utf-8")
    done = realign("report", str(not_json))
    assert done.returncode == 2
    assert "not JSON" in done.stderr and str(not_json) in done.stderr
    wrong = tmp_path / "merge.json"
    wrong.write_text(json.dumps({"id": "j2", "result": {"model_id": "m"}}), encoding="utf-8")
    done = realign("report", str(wrong))
    assert done.returncode == 2
    assert "not an evaluation report (spec: Field required)" in done.stderr
    assert not (tmp_path / "merge.html").exists()
    missing = realign("report", str(tmp_path / "none.json"))
    assert missing.returncode == 1 and "No such file" in missing.stderr


def test_report_help_says_what_it_takes() -> None:
    done = realign("report", "--help")
    assert done.returncode == 0
    for words in ("--out", "-o", "suffix .html", "result.evaluation", "Example: realign report"):
        assert words in done.stdout, words
    assert "report" in realign("--help").stdout
