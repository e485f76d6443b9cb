"""Eval jobs end to end on the embedded service and the real engine: a merge that asks
for an evaluation (its scores stored beside the model and shown in its model object), a
later eval job reusing them, a failed evaluation that registers nothing, an alpha sweep
that publishes its pick, one that no alpha passes (failed, its scores kept), and the HTML
report of each."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.demo.tiny import TinyTriple
from tests.api.live import merge_body, wait_for
from tests.evals.page import Page

pytestmark = pytest.mark.slow
EVAL = {"suites": ["format"], "limit": 4, "max_tokens": 16}


def _events(client: httpx.Client, job_id: str) -> list[str]:
    return [e["message"] for e in client.get(f"/v1/evals/{job_id}/events").json()]


def _report(client: httpx.Client, job_id: str) -> str:
    response = client.get(f"/v1/evals/{job_id}/report")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/html")
    assert "default-src 'none'" in response.headers["content-security-policy"]
    return response.text


def _format(model: dict[str, Any]) -> float:
    value = model["suites"]["format"]["metrics"]["format"]
    assert 0.0 <= value <= 1.0
    return float(value)


def test_merge_with_evaluation_then_a_cached_eval_job(
    alice: httpx.Client, llama_triple: TinyTriple, api_store: Path
) -> None:
    # alphas of their own: other modules' tests time merges of this triple at alpha 1
    body = merge_body(llama_triple, alpha=0.9, eval={**EVAL, "compare": ["instruct"]})
    job = wait_for(alice, alice.post("/merge", json=body).raise_for_status().json()["id"], 600)
    assert job["status"] == "succeeded", job["error"]
    report = job["result"]["evaluation"]
    labels = [m["label"] for m in report["models"]]
    assert labels == ["merge", "instruct"]
    assert all(m["suites"]["format"]["n"] == 4 for m in report["models"])
    first = [_format(m) for m in report["models"]]
    assert 'id="plot-scores"' in _report(alice, job["id"])

    # Stored beside the model (its key starts the record's), shown in its model object.
    model_id, merged_key = job["result"]["model_id"], job["result"]["merged_key"]
    card = alice.get(f"/v1/models/{model_id}").json()
    (scored,) = card["realign"]["evaluations"]
    assert scored["suite"] == "format" and scored["metrics"]["format"] == first[0]
    assert scored["n"] == 4 and scored["limit"] == 4 and scored["max_tokens"] == 16
    assert scored["key"].startswith(merged_key)
    record = json.loads((api_store / "evals" / scored["key"] / "realign-eval.json").read_text())
    assert record["content_key"] == merged_key and record["score"]["suite"] == "format"

    # The same model and reference on the same suite: scores come from the store.
    again = alice.post("/v1/evals", json={"model": model_id, **EVAL, "compare": ["instruct"]})
    assert again.status_code == 202, again.text
    assert again.headers["location"] == f"/v1/evals/{again.json()['id']}"
    done = wait_for(alice, again.json()["id"], 300)
    assert done["status"] == "succeeded" and done["kind"] == "eval", done["error"]
    assert done["object"] == "eval.job"
    assert [_format(m) for m in done["result"]["evaluation"]["models"]] == first
    log = _events(alice, done["id"])
    assert sum("cached: format" in line for line in log) == 2, log
    assert not any("starting an engine" in line for line in log), log


def test_sweep_publishes_the_pick(alice: httpx.Client, llama_triple: TinyTriple) -> None:
    sweep = {"sweep": [0.8, 0.4], "maximize": "format", "perplexity_limit": 10.0}
    body = merge_body(llama_triple, alpha=sweep, eval=EVAL, name="swept")
    job = wait_for(alice, alice.post("/merge", json=body).raise_for_status().json()["id"], 900)
    assert job["status"] == "succeeded", job["error"]
    report = job["result"]["evaluation"]
    by_label = {m["label"]: m for m in report["models"]}
    assert set(by_label) == {"target", "alpha=0.4", "alpha=0.8"}
    assert all("ppl_general" in m["suites"]["perplexity"]["metrics"] for m in by_label.values())
    chosen = by_label[report["chosen"]]
    # the pick: the best format score, ties to the alpha nearest 1
    best = max(_format(m) for label, m in by_label.items() if label != "target")
    assert _format(chosen) == best
    assert chosen["alpha"] == (0.8 if _format(by_label["alpha=0.8"]) == best else 0.4)
    assert "maximise format" in report["objective"]
    # the pick is what was published and registered
    assert job["spec"]["alpha"] == chosen["alpha"]
    models = {m["id"] for m in alice.get("/v1/models").json()["data"]}
    assert "swept" in models
    page = _report(alice, job["id"])
    assert 'id="plot-alpha-score"' in page and 'id="plot-alpha-ppl"' in page


def test_sweep_that_no_alpha_passes_fails_with_its_scores_and_report(
    alice: httpx.Client, llama_triple: TinyTriple
) -> None:
    """Nothing is published, yet the failed job carries every score, and its report says
    that no alpha qualified and why."""
    # alpha 10 either way is far from the target: several times its perplexity
    sweep = {"sweep": [-10, 10], "maximize": "format", "perplexity_limit": 1.5}
    body = merge_body(llama_triple, alpha=sweep, eval=EVAL, name="swept-none")
    job = wait_for(alice, alice.post("/merge", json=body).raise_for_status().json()["id"], 900)
    assert job["status"] == "failed", job
    assert job["error"]["code"] == "no_alpha_meets_objective"
    assert "alpha=-10: ppl_general" in job["error"]["message"]
    result = job["result"]
    assert result["model_id"] == result["merged_key"] == result["output"] == ""
    report = result["evaluation"]
    by_label = {m["label"]: m for m in report["models"]}
    assert set(by_label) == {"target", "alpha=-10", "alpha=10"}
    target = by_label["target"]["suites"]["perplexity"]["metrics"]["ppl_general"]
    assert report["chosen"] is None and set(report["rejected"]) == {"alpha=-10", "alpha=10"}
    for label, why in report["rejected"].items():
        ppl = by_label[label]["suites"]["perplexity"]["metrics"]["ppl_general"]
        assert ppl / target > 1.5
        assert why == f"ppl_general {ppl / target:.4g}x the target's (limit 1.5x)"
    assert all(_format(m) >= 0.0 for m in by_label.values())
    # nothing published or registered; the pick was never made, so alpha is unchanged
    assert job["spec"]["alpha"] == 1.0
    assert "swept-none" not in {m["id"] for m in alice.get("/v1/models").json()["data"]}
    page = Page(_report(alice, job["id"]))
    assert page.text["chosen"].startswith("none: no alpha met the objective")
    assert "1.5x" in page.text["rejected"]
    assert page.rows["alpha=-10"].classes == page.rows["alpha=10"].classes == {"rejected"}
    assert "plot-alpha-ppl" in page.figures


def test_eval_job_of_an_in_engine_model(alice: httpx.Client, llama_triple: TinyTriple) -> None:
    """A model served as an in-engine merge is evaluated as that merge, keyed by the pack,
    the target's content (not its path) and alpha: by its merge job (before it is
    registered), then by an eval job that finds those scores."""
    body = merge_body(
        llama_triple, alpha=0.7, serve=True, serve_mode="in_engine", name="inl", eval=EVAL
    )
    job = wait_for(alice, alice.post("/merge", json=body).raise_for_status().json()["id"], 600)
    assert job["status"] == "succeeded", job["error"]
    (scored,) = alice.get("/v1/models/inl").json()["realign"]["evaluations"]
    assert (
        scored["metrics"] == job["result"]["evaluation"]["models"][0]["suites"]["format"]["metrics"]
    )
    response = alice.post("/v1/evals", json={"model": "inl", **EVAL})
    assert response.status_code == 202, response.text
    done = wait_for(alice, response.json()["id"], 600)
    assert done["status"] == "succeeded", done["error"]
    (merged,) = done["result"]["evaluation"]["models"]
    assert _format(merged) >= 0.0
    key = merged["content_key"]
    assert key.startswith(f"inline-{job['result']['residual_key']}-") and key.endswith("-0.7")
    assert str(llama_triple.new_base) not in key
    assert any("cached: format" in line for line in _events(alice, done["id"]))


@pytest.mark.parametrize("mode", ["checkpoint", "in_engine"])
def test_a_failed_evaluation_registers_nothing(
    alice: httpx.Client, llama_triple: TinyTriple, sandbox: Path, api_store: Path, mode: str
) -> None:
    """The merge is published in the store (later merges reuse it), its evaluation fails
    for real (a text that is not UTF-8), and the job fails with no model registered,
    listed or announced for serving."""
    bad = sandbox / f"undecodable-{mode}.txt"
    bad.write_bytes(b"plain words, then \xff\xfe not UTF-8\n")
    name = f"unchecked-{mode}"
    check = {"suites": ["perplexity"], "texts": {"bad": str(bad)}, "limit": 2}
    body = merge_body(llama_triple, alpha=0.55, serve=True, serve_mode=mode, name=name, eval=check)
    job = wait_for(alice, alice.post("/merge", json=body).raise_for_status().json()["id"], 600)
    assert job["status"] == "failed" and job["stage"] == "evaluate", job
    assert job["error"]["code"] == "eval_failed", job["error"]
    assert "perplexity" in job["error"]["message"] and "utf-8" in job["error"]["message"]
    result = job["result"]  # where the merge went, and no model id: none is registered
    assert result is not None and result["model_id"] == "" and result["residual_key"]
    assert name not in {m["id"] for m in alice.get("/v1/models").json()["data"]}
    assert alice.get(f"/v1/models/{name}").status_code == 404
    log = _events(alice, job["id"])
    assert not any("waiting for an engine" in line for line in log), log
    if mode == "checkpoint":  # the checkpoint itself stays published, for reuse
        alphas = [
            json.loads((p / "realign.json").read_text())["alpha"]
            for p in (api_store / "merged").iterdir()
        ]
        assert 0.55 in alphas
        stored = api_store / "merged" / result["merged_key"]
        assert json.loads((stored / "realign.json").read_text())["alpha"] == 0.55
