"""Issue 8, points 1 and 9: a model whose load failed is answered as such (and remembered
until a new load is asked for); errors after the first byte of a stream go through the
one error mapper, with no internal text."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from app.api.app import create_app
from app.core.settings import Settings
from app.demo.tiny import TinyTriple
from tests.api.live import LiveServer, assert_error, merge_body, wait_for
from tests.jobs.conftest import RedisServer

pytestmark = pytest.mark.slow
QUESTION = [{"role": "user", "content": "What is the capital of the country?"}]


@pytest.fixture(scope="module")
def server(
    tmp_path_factory: pytest.TempPathFactory, llama_triple_fp32: TinyTriple
) -> Iterator[LiveServer]:
    settings = Settings(
        models_cache_dir=tmp_path_factory.mktemp("faults_serving_store"),
        engine="torch",
        engine_wait_s=60,
        allowed_roots=[llama_triple_fp32.base.parent],
    )
    with LiveServer(create_app(settings)) as live:
        yield live


def merged(live: LiveServer, triple: TinyTriple, name: str, **extra: Any) -> Path:
    with live.client() as c:
        job = c.post("/v1/merges", json=merge_body(triple, name=name, **extra)).json()
        done = wait_for(c, job["id"], timeout=180)
    assert done["status"] == "succeeded", done["error"]
    return Path(done["result"]["output"])


def test_chat_with_a_model_whose_load_failed(
    server: LiveServer, llama_triple_fp32: TinyTriple
) -> None:
    out = merged(server, llama_triple_fp32, "broken", alpha=0.25)
    shard = sorted(out.glob("*.safetensors"))[0]
    good = shard.read_bytes()
    shard.write_bytes(b"\xff" * 8 + good[8:])  # a header length no file can have
    requests: list[httpx.Request] = []
    http = httpx.Client(event_hooks={"request": [requests.append]})
    sdk = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", http_client=http)
    started = time.monotonic()
    with pytest.raises(openai.APIStatusError) as exc:  # default max_retries: 2
        sdk.chat.completions.create(model="broken", messages=QUESTION)  # type: ignore[arg-type]
    assert len(requests) == 1, "the SDK retried a load that cannot succeed"
    assert time.monotonic() - started < 30
    error = exc.value
    assert error.status_code == 503 and error.code == "model_load_failed"
    assert error.response.headers["x-should-retry"] == "false"
    assert "Retry-After" not in error.response.headers
    message = error.response.json()["error"]["message"]
    assert "'broken'" in message and "failed to load" in message
    # the pool checks the files against the merge's manifest before an engine reads them
    assert "model.safetensors does not match its recorded checksum" in message, message
    assert "unexpected error" not in message

    # remembered: with the file repaired, chat still says so until a load is requested
    shard.write_bytes(good)
    with server.client() as c:
        again = c.post("/v1/chat/completions", json={"model": "broken", "messages": QUESTION})
        assert assert_error(again, 503, "model_load_failed")["message"] == message
        stream = c.post(
            "/v1/chat/completions",
            json={"model": "broken", "messages": QUESTION, "stream": True},
        )
        assert_error(stream, 503, "model_load_failed")  # before the first SSE byte
        states = {m["id"]: m["realign"]["state"] for m in c.get("/v1/models").json()["data"]}
        assert states["broken"] == "failed"
        assert c.post("/admin/models/broken/load").json()["status"] == "ready"
    reply = sdk.chat.completions.create(
        model="broken",
        messages=QUESTION,  # type: ignore[arg-type]
        max_tokens=4,
        temperature=0,
    )
    assert reply.choices[0].message.content is not None


def test_a_tiny_temperature_is_greedy(server: LiveServer, llama_triple_fp32: TinyTriple) -> None:
    """1e-45 once overflowed the sampler's logits to inf (softmax NaN, a failed stream)."""
    merged(server, llama_triple_fp32, "cool-model", serve=True)
    body = {"model": "cool-model", "messages": QUESTION, "max_tokens": 6}
    with server.client() as c:
        tiny = c.post("/v1/chat/completions", json={**body, "temperature": 1e-45})
        greedy = c.post("/v1/chat/completions", json={**body, "temperature": 0})
    assert tiny.status_code == 200, tiny.text
    content = [r.json()["choices"][0]["message"]["content"] for r in (tiny, greedy)]
    assert content[0] == content[1]


def test_engine_failure_mid_stream_is_mapped_once(
    server: LiveServer,
    llama_triple_fp32: TinyTriple,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The sampler fails on the second token (an injected engine bug, with the kind of
    message torch gives): the stream has started, so it ends with one mapped error."""
    import app.engines.hf as hf

    calls = {"n": 0}
    sample = hf._sample

    def failing(*args: Any, **kwargs: Any) -> int:
        calls["n"] += 1
        if calls["n"] % 2 == 0:
            raise RuntimeError("probability tensor contains either `inf`, `nan` or element < 0")
        return sample(*args, **kwargs)

    merged(server, llama_triple_fp32, "ok-model", serve=True)
    monkeypatch.setattr(hf, "_sample", failing)
    body = {"model": "ok-model", "messages": QUESTION, "temperature": 0, "max_tokens": 8}
    caplog.set_level(logging.ERROR, logger="app.api")
    with (
        server.client() as c,
        c.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as r,
    ):
        assert r.status_code == 200
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    assert json.loads(lines[0].removeprefix("data: "))["choices"][0]["delta"]["role"] == "assistant"
    error = json.loads(lines[-2].removeprefix("data: "))["error"]
    assert error["type"] == "server_error" and error["code"] == "internal_error"
    assert "probability" not in error["message"] and "tensor" not in error["message"]
    request_id = error["message"].split("request id ")[1].rstrip(".")
    assert any(request_id in rec.getMessage() and rec.exc_info for rec in caplog.records)
    # the same failure without streaming: a generic 500 with the id, logged
    with server.client() as c:
        plain = c.post("/v1/chat/completions", json=body)
    detail = assert_error(plain, 500, "internal_error")
    assert plain.headers["X-Request-Id"] in detail["message"]
    assert "probability" not in detail["message"]


def test_job_event_stream_error_after_first_byte(
    tmp_path: Path,
    redis_server: RedisServer,
    llama_triple_fp32: TinyTriple,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Redis dies while a job's events stream: the stream ends with one mapped error event."""
    settings = Settings(
        models_cache_dir=tmp_path / "store",
        redis_url=redis_server.url,
        allowed_roots=[llama_triple_fp32.base.parent],
    )
    caplog.set_level(logging.ERROR, logger="app.api")
    with LiveServer(create_app(settings)) as live, live.client() as c:
        job = c.post("/v1/merges", json=merge_body(llama_triple_fp32)).json()  # no worker
        headers = {"Accept": "text/event-stream"}
        with c.stream("GET", f"/v1/merges/{job['id']}/events", headers=headers) as r:
            lines = r.iter_lines()
            first = next(line for line in lines if line.startswith("data: "))
            assert json.loads(first.removeprefix("data: "))["seq"] >= 1
            redis_server.stop()
            rest = [line for line in lines if line]
    assert "event: error" in rest, rest
    error = json.loads(rest[rest.index("event: error") + 1].removeprefix("data: "))["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "server_error"
    text = error["message"]
    assert str(redis_server.port) not in text and "Connection" not in text, text
    if error["code"] == "internal_error":
        request_id = text.split("request id ")[1].rstrip(".")
        assert any(request_id in rec.getMessage() for rec in caplog.records)


def test_a_model_merged_again_is_not_held_to_the_old_failure(
    server: LiveServer, llama_triple_fp32: TinyTriple
) -> None:
    out = merged(server, llama_triple_fp32, "remade", alpha=0.3)
    shard = sorted(out.glob("*.safetensors"))[0]
    shard.write_bytes(b"\xff" * 8 + shard.read_bytes()[8:])
    chat = {"model": "remade", "messages": QUESTION, "max_tokens": 3, "temperature": 0}
    with server.client() as c:
        assert_error(c.post("/v1/chat/completions", json=chat), 503, "model_load_failed")
        merged(server, llama_triple_fp32, "remade", alpha=0.6)  # other weights, same name
        reply = c.post("/v1/chat/completions", json=chat)
    assert reply.status_code == 200, reply.text
