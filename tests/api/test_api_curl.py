"""The README's curl commands, as written (``-d`` without a JSON content type), against a
live server: submit with serve=true, follow the job, stream a chat."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator

import pytest

from app.api.app import create_app
from app.core.settings import Settings
from app.demo.tiny import TinyTriple
from tests.api.live import TERMINAL, LiveServer

pytestmark = pytest.mark.slow

# Copied from the README's "The service" block; only host, port, paths and ids differ.
SUBMIT = """curl -s localhost:8000/merge -H 'Idempotency-Key: news-2026-11' -d '{
  "base": "/models/llama-3-8b", "instruct": "/models/llama-3-8b-instruct",
  "target": "/models/llama-3-8b-news", "alpha": 1.0, "serve": true, "name": "news-instruct"}'"""
STATUS = "curl -s localhost:8000/v1/merges/mrg_…"
EVENTS = "curl -sN -H 'Accept: text/event-stream' localhost:8000/v1/merges/mrg_…/events"
CHAT = """curl -s localhost:8000/v1/chat/completions -d '{"model": "news-instruct",
  "messages": [{"role": "user", "content": "What happened in Lakeview?"}], "stream": true}'"""
CANCEL = "curl -s -XPOST localhost:8000/v1/merges/mrg_…/cancel"


@pytest.fixture(scope="module")
def server(
    tmp_path_factory: pytest.TempPathFactory, llama_triple_fp32: TinyTriple
) -> Iterator[LiveServer]:
    settings = Settings(
        models_cache_dir=tmp_path_factory.mktemp("curl_store"),
        engine="torch",
        engine_wait_s=60,
        allowed_roots=[llama_triple_fp32.base.parent],
    )
    with LiveServer(create_app(settings)) as live:
        yield live


def run(command: str, live: LiveServer, triple: TinyTriple, job: str = "") -> str:
    """Run a README command line through the shell with this server's port and models."""
    port = live.url.rsplit(":", 1)[1]
    line = (
        command.replace("localhost:8000", f"localhost:{port}")
        .replace("/models/llama-3-8b-instruct", str(triple.instruct))
        .replace("/models/llama-3-8b-news", str(triple.new_base))
        .replace("/models/llama-3-8b", str(triple.base))
        .replace("mrg_…", job)
    )
    assert "-H 'Content-Type" not in line  # the point: curl's default form content type
    done = subprocess.run(
        ["bash", "-c", line], capture_output=True, text=True, timeout=120, check=True
    )
    return done.stdout


def test_readme_curl_commands_work_as_written(
    server: LiveServer, llama_triple_fp32: TinyTriple
) -> None:
    t = llama_triple_fp32
    job = json.loads(run(SUBMIT, server, t))
    assert job["status"] in ("queued", "validating", "running"), job
    again = json.loads(run(SUBMIT, server, t))  # same Idempotency-Key: same job
    assert again["id"] == job["id"]
    deadline = time.monotonic() + 180
    while (status := json.loads(run(STATUS, server, t, job["id"])))["status"] not in TERMINAL:
        assert time.monotonic() < deadline, status
        time.sleep(0.2)
    assert status["status"] == "succeeded", status["error"]
    events = run(EVENTS, server, t, job["id"])
    assert "event: succeeded" in events or '"succeeded"' in events
    stream = [line for line in run(CHAT, server, t).splitlines() if line]
    assert stream[-1] == "data: [DONE]"
    chunks = [json.loads(line.removeprefix("data: ")) for line in stream[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks), chunks[:2]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    cancel = json.loads(run(CANCEL, server, t, job["id"]))  # a finished job: 409, JSON
    assert cancel["error"]["code"] == "job_state_conflict"


def test_form_encoded_non_json_body_is_an_invalid_json_error(
    server: LiveServer, llama_triple_fp32: TinyTriple
) -> None:
    out = run("curl -s localhost:8000/v1/merges -d 'base=/x&target=/y'", server, llama_triple_fp32)
    error = json.loads(out)["error"]
    assert error["code"] == "invalid_json" and error["type"] == "invalid_request_error"
    chat = run("curl -s localhost:8000/v1/chat/completions -d 'model=x'", server, llama_triple_fp32)
    assert json.loads(chat)["error"]["code"] == "invalid_json"
