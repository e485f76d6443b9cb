"""Eval jobs through the API: bad requests refused before anything is queued, and the
report of a job that ran no evaluation is a clear 409."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from app.demo.tiny import TinyTriple
from tests.api.live import assert_error, merge_body, settle
from tests.api.test_api_inputs import nothing_queued_or_stored


@pytest.mark.parametrize(
    ("body", "status", "words"),
    [
        ({"model": "no-such-model"}, 404, "GET /v1/models"),
        ({"model": "/etc"}, 403, "outside the allowed"),
        ({"model": "MODEL", "suites": ["custom"]}, 400, "tasks_dir"),
        ({"model": "MODEL", "tasks": ["x"]}, 400, "custom suite"),
        ({"model": "MODEL", "compare": ["base"]}, 400, "only a model a merge job made"),
        (
            {"model": "MODEL", "suites": ["perplexity"], "texts": {"news": "/etc/passwd"}},
            403,
            "texts.news",
        ),
        (
            {"model": "MODEL", "suites": ["perplexity"], "texts": {"news": "HERE/none.txt"}},
            404,
            "no such file",
        ),
        ({"model": "MODEL", "suites": []}, 422, None),
        ({"model": "MODEL", "suites": ["mmlu"]}, 422, None),
        ({"model": "MODEL", "limit": 0}, 422, None),
    ],
)
def test_bad_eval_requests_are_refused(
    body: dict[str, object],
    status: int,
    words: str | None,
    alice: httpx.Client,
    root: httpx.Client,
    api_store: Path,
    llama_triple: TinyTriple,
) -> None:
    model = str(llama_triple.instruct)
    text = {k: (v.replace("MODEL", model) if isinstance(v, str) else v) for k, v in body.items()}
    if "texts" in text:
        here = str(llama_triple.base.parent)
        text["texts"] = {k: v.replace("HERE", here) for k, v in body["texts"].items()}  # type: ignore[union-attr]
    with nothing_queued_or_stored(root, api_store):
        error = assert_error(alice.post("/v1/evals", json=text), status)
    if words is not None:
        assert words in error["message"], error


def test_report_of_a_job_without_evaluation_is_409(
    alice: httpx.Client, root: httpx.Client, llama_triple: TinyTriple
) -> None:
    # alpha of its own: other modules' tests time a merge of this triple at alpha 1 whole
    body = merge_body(llama_triple, alpha=0.3)
    job = alice.post("/v1/merges", json=body).raise_for_status().json()
    settle(root)
    error = assert_error(alice.get(f"/v1/evals/{job['id']}/report"), 409)
    assert "asked for no evaluation" in error["message"]
    assert_error(alice.get("/v1/evals/evl_nope/report"), 404)


@pytest.mark.parametrize(
    ("alpha", "extra", "status", "words"),
    [
        ({"sweep": [0.5, 0.5]}, {}, 422, "twice"),
        ({"sweep": [0.5]}, {}, 422, None),
        ({"sweep": [0.5, 11]}, {}, 422, "[-10, 10]"),
        ({"sweep": [0.5, 1.0], "perplexity_limit": 0.9}, {}, 422, None),
        ({"sweep": [0.5, 1.0]}, {"method": "ties"}, 400, "cannot be swept"),
        ({"sweep": [0.5, 1.0], "maximize": "perplexity"}, {}, 400, "format or ifeval-lite"),
        (11, {}, 422, None),
    ],
)
def test_bad_sweeps_are_refused(
    alpha: object,
    extra: dict[str, object],
    status: int,
    words: str | None,
    alice: httpx.Client,
    root: httpx.Client,
    api_store: Path,
    llama_triple: TinyTriple,
) -> None:
    body = merge_body(llama_triple, alpha=alpha, **extra)
    with nothing_queued_or_stored(root, api_store):
        error = assert_error(alice.post("/merge", json=body), status)
    if words is not None:
        assert words in error["message"], error


def test_a_sweep_spec_is_recorded_whole(
    alice: httpx.Client, root: httpx.Client, llama_triple: TinyTriple
) -> None:
    """The alphas sorted, the objective's defaults, and the suites it needs added."""
    body = merge_body(llama_triple, alpha={"sweep": [0.45, 0.35]}, eval={"suites": ["format"]})
    response = alice.post("/merge", json=body)
    assert response.status_code == 202, response.text
    spec = response.json()["spec"]
    alice.post(f"/v1/merges/{response.json()['id']}/cancel")
    settle(root)
    want = {"maximize": "ifeval-lite", "perplexity_limit": 1.05, "sweep": [0.35, 0.45]}
    assert spec["sweep"] == want
    assert spec["eval"]["suites"] == ["format", "ifeval-lite", "perplexity"]
