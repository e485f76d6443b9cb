"""POST /merge and the lineage check, over real HTTP against the embedded service: an
unrelated target fails the job in preflight with its code and writes nothing;
``force: true`` merges it and the result carries the figures."""

from __future__ import annotations

from pathlib import Path

import httpx

from app.demo.tiny import TinyTriple
from tests.api.live import merge_body, wait_for


def _artifacts(store: Path) -> set[str]:
    return {p.name for kind in ("residuals", "merged") for p in (store / kind).glob("*")}


def test_unrelated_target_fails_in_preflight_and_force_merges(
    alice: httpx.Client, llama_triple: TinyTriple, llama_unrelated: Path, api_store: Path
) -> None:
    body = merge_body(llama_triple, target=str(llama_unrelated), alpha=0.75)
    before = _artifacts(api_store)
    job = alice.post("/merge", json=body).json()
    done = wait_for(alice, job["id"])
    assert (done["status"], done["stage"]) == ("failed", "preflight"), done
    assert done["error"]["code"] == "unrelated_models"
    message = done["error"]["message"]
    assert "target does not descend from the base" in message and "limit 0.8" in message
    assert '"force": true in POST /merge' in message
    assert done["result"] is None and _artifacts(api_store) == before

    forced = alice.post("/merge", json={**body, "force": True}).json()
    assert forced["spec"]["force"] is True
    done = wait_for(alice, forced["id"])
    assert done["status"] == "succeeded", done["error"]
    lineage = done["result"]["lineage"]
    assert lineage["forced"] is True and lineage["passed"] is False
    assert lineage["distances"]["target-base"]["median"] > 1.3
    assert done["result"]["manifest"]["lineage"] == lineage
    events = alice.get(f"/v1/merges/{forced['id']}/events").json()
    assert any(e["message"].startswith("lineage: instruct-base") for e in events)


def test_related_merge_result_carries_the_figures(
    alice: httpx.Client, llama_triple: TinyTriple
) -> None:
    job = alice.post("/v1/merges", json=merge_body(llama_triple, alpha=0.625)).json()
    done = wait_for(alice, job["id"])
    assert done["status"] == "succeeded", done["error"]
    lineage = done["result"]["lineage"]
    assert lineage["passed"] is True and lineage["forced"] is False
    assert set(lineage["distances"]) == {"instruct-base", "target-base", "target-instruct"}
    assert lineage["distances"]["target-base"]["median"] < lineage["max_distance"]


def test_residual_job_refuses_an_unrelated_instruct_model(
    alice: httpx.Client, llama_triple: TinyTriple, llama_unrelated: Path, api_store: Path
) -> None:
    body = {"base": str(llama_triple.base), "instruct": str(llama_unrelated)}
    before = _artifacts(api_store)
    done = wait_for(alice, alice.post("/v1/residuals", json=body).json()["id"])
    assert done["status"] == "failed" and done["error"]["code"] == "unrelated_models"
    assert _artifacts(api_store) == before
    done = wait_for(alice, alice.post("/v1/residuals", json={**body, "force": True}).json()["id"])
    assert done["status"] == "succeeded", done["error"]
    assert done["result"]["lineage"]["forced"] is True
