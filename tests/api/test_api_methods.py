"""Merge methods and several residuals over real HTTP, run by the real embedded worker."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
import torch

from app.demo.tiny import TinyTriple
from app.jobs.models import MergeSpec
from app.merge import ResidualInput, merge_to_store
from tests.api.live import assert_error, merge_body, wait_for
from tests.helpers import load_dir


def _same_tensors(a: Path, b: Path) -> None:
    got, want = load_dir(a), load_dir(b)
    assert got.keys() == want.keys()
    for name in want:
        assert torch.equal(got[name].view(torch.int16), want[name].view(torch.int16)), name


def test_ties_job_equals_the_engine(
    alice: httpx.Client, llama_triple: TinyTriple, api_store: Path, tmp_path: Path
) -> None:
    body = merge_body(llama_triple, method="ties", params={"density": 0.3}, alpha=0.8)
    response = alice.post("/merge", json=body)
    assert response.status_code == 202, response.text
    job = response.json()
    assert (job["spec"]["method"], job["spec"]["params"]) == ("ties", {"density": 0.3})
    done = wait_for(alice, job["id"])
    assert done["status"] == "succeeded", done["error"]
    manifest = done["result"]["manifest"]
    assert manifest["method"] == "ties" and manifest["params"] == {"density": 0.3}
    t = llama_triple
    ref = merge_to_store(
        base=str(t.base), instruct=str(t.instruct), target=str(t.new_base), alpha=0.8,
        method="ties", params={"density": 0.3}, store=tmp_path / "ref",
    )  # fmt: skip
    assert done["result"]["merged_key"] == ref.key  # same inputs, method, params: same key
    _same_tensors(Path(done["result"]["output"]), ref.path)
    # Another density reuses the stored residual but is another merged model.
    other = alice.post("/v1/merges", json={**body, "params": {"density": 0.6}}).json()
    again = wait_for(alice, other["id"])
    assert again["status"] == "succeeded", again["error"]
    assert again["result"]["residual_key"] == done["result"]["residual_key"]
    assert again["result"]["merged_key"] != done["result"]["merged_key"]


def test_several_residuals_in_one_job(
    alice: httpx.Client, llama_triple: TinyTriple, tmp_path: Path
) -> None:
    t = llama_triple
    # instruct - base, and a "domain" residual (new_base - base) at half weight
    items = [
        {"base": str(t.base), "instruct": str(t.instruct)},
        {"base": str(t.base), "instruct": str(t.new_base), "weight": 0.5},
    ]
    body = {
        "target": str(t.new_base),
        "residuals": items,
        "method": "dare",
        "params": {"drop_rate": 0.4, "seed": 3},
    }
    response = alice.post("/v1/merges", json=body)
    assert response.status_code == 202, response.text
    done = wait_for(alice, response.json()["id"])
    assert done["status"] == "succeeded", done["error"]
    used = done["result"]["manifest"]["residuals"]
    assert [r["weight"] for r in used] == [1.0, 0.5]
    ref = merge_to_store(
        target=str(t.new_base), method="dare", params={"drop_rate": 0.4, "seed": 3},
        residuals=[ResidualInput(**item) for item in items],  # type: ignore[arg-type]
        store=tmp_path / "ref",
    )  # fmt: skip
    assert done["result"]["merged_key"] == ref.key
    _same_tensors(Path(done["result"]["output"]), ref.path)
    # By stored keys, a prefix pinned to the full key at validation.
    keys = [{"key": r["key"][:10]} for r in used]
    keyed = alice.post("/v1/merges", json={**body, "residuals": keys}).json()
    finished = wait_for(alice, keyed["id"])
    assert finished["status"] == "succeeded", finished["error"]
    assert finished["resolved"]["residuals[0].key"] == used[0]["key"]


@pytest.mark.parametrize(
    ("extra", "status", "message"),
    [
        ({"method": "slerp"}, 400, "unknown merge method 'slerp'"),
        ({"method": "ties", "params": {"drop_rate": 0.5}}, 400, "no parameter 'drop_rate'"),
        ({"method": "ties", "params": {"density": 2}}, 400, "density=2.0 is out of range"),
        ({"method": "dare", "params": {"seed": 0.5}}, 400, "whole number"),
        ({"params": {"density": 0.5}}, 400, "task_arithmetic has no parameter"),
        (
            {"method": "ties", "serve": True, "serve_mode": "in_engine"},
            400,
            "serve_mode 'checkpoint'",
        ),
        ({"method": "ties", "params": {"density": "high"}}, 422, "params.density"),
        ({"method": "Ties!"}, 422, "method"),
    ],
)
def test_bad_methods_and_params_are_refused(
    alice: httpx.Client,
    llama_triple: TinyTriple,
    extra: dict[str, object],
    status: int,
    message: str,
) -> None:
    response = alice.post("/v1/merges", json=merge_body(llama_triple, **extra))
    error = assert_error(response, status)
    assert message in error["message"], error
    if status == 400:
        assert error["code"] == "invalid_parameter"


def test_bad_residual_lists_are_refused(alice: httpx.Client, llama_triple: TinyTriple) -> None:
    t = llama_triple
    pair = {"base": str(t.base), "instruct": str(t.instruct)}
    cases = [
        ({"residuals": [{**pair, "weight": 0}]}, 400, "weight must be a finite nonzero"),
        ({"residuals": [pair], "base": str(t.base)}, 422, "not both"),
        ({"residuals": [{"base": str(t.base)}]}, 422, "give 'base' and 'instruct'"),
        ({"residuals": [{**pair, "key": "abcdef"}]}, 422, "not both"),
        ({"residuals": [{"key": "0123456789"}]}, 404, "0123456789"),
    ]
    for body, status, message in cases:
        body = {"target": str(t.new_base), **body}
        error = assert_error(alice.post("/v1/merges", json=body), status)
        assert message in error["message"], (body, error)


def test_fingerprint_of_a_classic_request_is_unchanged() -> None:
    spec = MergeSpec(target="/m/t", base="/m/b", instruct="/m/i", alpha=0.5)
    later = {"method", "params", "residuals", "force", "sweep", "eval"}
    before = spec.model_dump_json(exclude=later)
    assert spec.fingerprint_json() == before
    ties = spec.model_copy(update={"method": "ties"})
    assert ties.fingerprint_json() != before
