"""Live job events as server-sent events: progress arrives, the stream ends with the job."""

from __future__ import annotations

import json
import time
from typing import Any

import httpx

from app.demo.tiny import TinyTriple
from tests.api.live import merge_body, wait_for

SSE = {"Accept": "text/event-stream"}


def read_stream(client: httpx.Client, job_id: str, **headers: str) -> list[dict[str, Any]]:
    """Every SSE frame until the server closes the stream, as {id, event, data}."""
    frames: list[dict[str, Any]] = []
    frame: dict[str, Any] = {}
    with client.stream("GET", f"/v1/merges/{job_id}/events", headers={**SSE, **headers}) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if not line:
                if frame:
                    frames.append(frame)
                frame = {}
            elif line.startswith(":"):
                continue
            else:
                field, _, value = line.partition(": ")
                frame[field] = json.loads(value) if field == "data" else value
    return frames


def test_stream_yields_progress_and_ends_with_the_job(
    alice: httpx.Client, qwen_triple: TinyTriple
) -> None:
    job = alice.post("/v1/merges", json=merge_body(qwen_triple, alpha=0.2)).json()
    started = time.monotonic()
    frames = read_stream(alice, job["id"])
    assert time.monotonic() - started < 60

    kinds = [f["event"] for f in frames]
    assert kinds[0] == "status" and frames[0]["data"]["status"] == "queued"
    assert "progress" in kinds
    # A pair's first merge computes the residual and applies it in one pass, reported as
    # stage "residual"; "apply" carries only tensors copied from the target (none here).
    steps = [f["data"] for f in frames if f["event"] == "progress"]
    pct = [d["progress"]["percent"] for d in steps if d["stage"] == "residual"]
    assert pct and pct == sorted(pct) and pct[-1] == 100.0
    assert {d["stage"] for d in steps} <= {"residual", "apply"}
    assert frames[-1]["data"]["status"] == "succeeded"
    assert [int(f["id"]) for f in frames] == [f["data"]["seq"] for f in frames]
    assert wait_for(alice, job["id"])["status"] == "succeeded"

    # Resuming after the last event a client saw replays only what came later.
    later = read_stream(alice, job["id"], **{"Last-Event-ID": frames[-3]["id"]})
    assert [f["id"] for f in later] == [f["id"] for f in frames[-2:]]


def test_stream_of_a_finished_job_ends_at_once(
    alice: httpx.Client, llama_triple: TinyTriple
) -> None:
    job = alice.post("/v1/merges", json=merge_body(llama_triple, alpha=0.6)).json()
    wait_for(alice, job["id"])
    started = time.monotonic()
    frames = read_stream(alice, job["id"])
    assert time.monotonic() - started < 10  # no wait for events that cannot come
    json_events = alice.get(f"/v1/merges/{job['id']}/events").json()
    assert [f["data"] for f in frames] == json_events
