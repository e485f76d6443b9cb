"""Merge jobs over real HTTP: submit, poll, result on disk, duplicates, paging, cancel."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

import httpx
import torch
from transformers import AutoModelForCausalLM

from app.demo.tiny import TinyTriple
from tests.api.live import assert_error, merge_body, wait_for
from tests.helpers import load_dir


def test_submit_poll_succeeds_and_output_loads(
    alice: httpx.Client, llama_triple: TinyTriple, api_store: Path
) -> None:
    response = alice.post("/v1/merges", json=merge_body(llama_triple, alpha=1.0))
    assert response.status_code == 202, response.text
    job = response.json()
    assert response.headers["location"] == f"/v1/merges/{job['id']}"
    assert (job["object"], job["owner"], job["status"]) == ("merge.job", "alice", "queued")
    assert "fingerprint" not in job

    done = wait_for(alice, job["id"])
    assert done["status"] == "succeeded", done["error"]
    assert done["progress"]["percent"] == 100.0
    result = done["result"]
    assert result["model_id"].startswith("realign-")
    out = Path(result["output"])
    assert out.is_relative_to(api_store)

    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.model_type == "llama"
    merged = load_dir(out)
    t = llama_triple
    base, instruct, new = load_dir(t.base), load_dir(t.instruct), load_dir(t.new_base)
    assert merged.keys() == new.keys()
    name = "model.layers.0.mlp.up_proj.weight"
    expected = new[name].float() + (instruct[name].float() - base[name].float())
    torch.testing.assert_close(merged[name].float(), expected, atol=2e-3, rtol=0)

    events = alice.get(f"/v1/merges/{job['id']}/events").json()
    seqs = [e["seq"] for e in events]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
    assert events[0]["status"] == "queued" and events[-1]["status"] == "succeeded"
    assert any(e["kind"] == "progress" for e in events)
    later = alice.get(f"/v1/merges/{job['id']}/events", params={"after": seqs[-2]}).json()
    assert [e["seq"] for e in later] == seqs[-1:]


def test_idempotency_key_attaches_to_the_same_job(
    alice: httpx.Client, llama_triple: TinyTriple
) -> None:
    body = merge_body(llama_triple, alpha=0.5)
    headers = {"Idempotency-Key": "retry-7f3c"}
    first = alice.post("/merge", json=body, headers=headers)  # the short alias
    assert first.status_code == 202, first.text
    again = alice.post("/v1/merges", json=body, headers=headers)
    assert again.status_code == 200, again.text
    assert again.json()["id"] == first.json()["id"]
    wait_for(alice, first.json()["id"])
    # Still the same job after it finished: the key, not the state, identifies it.
    assert alice.post("/v1/merges", json=body, headers=headers).json()["id"] == first.json()["id"]
    other = alice.post("/v1/merges", json=merge_body(llama_triple, alpha=0.25), headers=headers)
    assert_error(other, 409, "job_state_conflict")


def test_identical_submission_attaches_while_in_flight(
    alice: httpx.Client, llama_triple: TinyTriple
) -> None:
    body = merge_body(llama_triple, alpha=0.75)
    first = alice.post("/v1/merges", json=body)
    second = alice.post("/v1/merges", json=body)
    assert first.status_code == 202
    if second.status_code == 200:
        assert second.json()["id"] == first.json()["id"]
    else:  # only allowed when the first had already finished (a very fast machine)
        assert second.status_code == 202
        done = wait_for(alice, first.json()["id"])
        finished = datetime.fromisoformat(done["finished_at"])
        assert finished <= datetime.fromisoformat(second.json()["created_at"])
    wait_for(alice, second.json()["id"])


def test_list_is_paged_filtered_and_own_only(
    alice: httpx.Client, bob: httpx.Client, llama_triple: TinyTriple
) -> None:
    job = alice.post("/v1/merges", json=merge_body(llama_triple, alpha=0.1)).json()
    wait_for(alice, job["id"])
    page = alice.get("/v1/merges", params={"limit": 1}).json()
    assert page["object"] == "list" and (page["offset"], page["limit"]) == (0, 1)
    assert len(page["data"]) == 1 and page["total"] >= 1
    assert page["data"][0]["id"] == job["id"]  # newest first
    succeeded = alice.get("/v1/merges", params={"status": "succeeded", "limit": 200}).json()
    assert succeeded["data"] and {j["status"] for j in succeeded["data"]} == {"succeeded"}
    assert {j["owner"] for j in succeeded["data"]} == {"alice"}
    assert job["id"] not in {j["id"] for j in bob.get("/v1/merges").json()["data"]}
    assert_error(alice.get("/v1/merges", params={"status": "bogus"}), 422)
    assert_error(alice.get("/v1/merges", params={"limit": 0}), 422)


def test_cancel_a_queued_job(
    alice: httpx.Client, llama_triple: TinyTriple, qwen_triple: TinyTriple
) -> None:
    # The embedded worker runs one step at a time: a fresh residual keeps it busy, so
    # the job behind it is still waiting when the cancel arrives.
    busy = alice.post("/v1/merges", json=merge_body(qwen_triple, dtype="float32")).json()
    victim = alice.post("/v1/merges", json=merge_body(llama_triple, alpha=-0.5)).json()
    response = alice.post(f"/v1/merges/{victim['id']}/cancel")
    assert response.status_code == 200, response.text
    assert response.json()["id"] == victim["id"]

    done = wait_for(alice, victim["id"])
    assert done["status"] == "cancelled" and done["result"] is None
    events = alice.get(f"/v1/merges/{victim['id']}/events").json()
    assert any("cancel requested by alice" in e["message"] for e in events)
    assert_error(alice.post(f"/v1/merges/{victim['id']}/cancel"), 409, "job_state_conflict")
    assert wait_for(alice, busy["id"])["status"] == "succeeded"
    assert_error(alice.post("/v1/merges/mrg_doesnotexist/cancel"), 404, "job_not_found")
