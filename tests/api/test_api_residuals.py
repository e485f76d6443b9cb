"""Residual packs over HTTP: compute one as a job, list, inspect, delete (admin)."""

from __future__ import annotations

from pathlib import Path

import httpx

from app.demo.tiny import TinyTriple
from tests.api.live import assert_error, merge_body, wait_for


def test_residual_job_list_inspect_apply_delete(
    alice: httpx.Client, root: httpx.Client, qwen_triple: TinyTriple, api_store: Path
) -> None:
    t = qwen_triple
    body = {"base": str(t.base), "instruct": str(t.instruct), "dtype": "float16"}
    response = alice.post("/v1/residuals", json=body)
    assert response.status_code == 202, response.text
    job = response.json()
    assert job["spec"]["target"] is None
    done = wait_for(alice, job["id"])
    assert done["status"] == "succeeded", done["error"]
    key = done["result"]["residual_key"]

    listed = {r["key"] for r in alice.get("/v1/residuals").json()["data"]}
    assert key in listed
    shown = alice.get(f"/v1/residuals/{key[:12]}")  # a unique prefix is enough
    assert shown.status_code == 200 and shown.json()["key"] == key
    assert shown.json()["manifest"]["dtype"] == "float16"

    # The pack alone + a compatible base is a merge.
    merge = {"target": str(qwen_triple.new_base), "residual": key, "alpha": 0.5}
    merged = wait_for(alice, alice.post("/v1/merges", json=merge).json()["id"])
    assert merged["status"] == "succeeded" and merged["result"]["residual_key"] == key

    deleted = root.delete(f"/v1/residuals/{key}")
    assert deleted.status_code == 200 and deleted.json() == {
        "id": key,
        "object": "residual",
        "deleted": True,
    }
    assert_error(alice.get(f"/v1/residuals/{key}"), 404, "artifact_not_found")
    assert_error(root.delete(f"/v1/residuals/{key}"), 404, "artifact_not_found")
    assert not (api_store / "residuals" / key).exists()


def test_residual_bodies_are_validated(alice: httpx.Client, qwen_triple: TinyTriple) -> None:
    assert_error(alice.post("/v1/residuals", json={"base": str(qwen_triple.base)}), 422)
    with_target = merge_body(qwen_triple)  # a target has no place in a residual-only job
    assert assert_error(alice.post("/v1/residuals", json=with_target), 422)["param"] == "target"
