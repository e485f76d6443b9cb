"""End to end on the real vLLM engine (its CPU build here, the same code on GPUs):
POST /merge with serve=true -> chat through the openai client from the merged weights."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from app.api.app import create_app
from app.core.settings import Settings
from app.demo.tiny import TinyTriple
from tests.api.live import LiveServer
from tests.serving.test_serving import QUESTION, reference_greedy, serve_merge

pytestmark = pytest.mark.slow
# Memory and context length on their defaults; float32 to compare with transformers
# exactly, eager for a quick start.
VLLM_CPU_ARGS = {"dtype": "float32", "enforce_eager": True, "max_num_seqs": 8}


@pytest.fixture(scope="module")
def server(
    tmp_path_factory: pytest.TempPathFactory, llama_triple_fp32: TinyTriple
) -> Iterator[LiveServer]:
    store = tmp_path_factory.mktemp("vllm_store")
    settings = Settings(
        models_cache_dir=store,
        engine="vllm",
        engine_wait_s=180,
        vllm_args=json.dumps(VLLM_CPU_ARGS),
        allowed_roots=[llama_triple_fp32.base.parent],
    )
    with LiveServer(create_app(settings)) as live:
        yield live


def ask(live: LiveServer, model: str, stream: bool = False) -> str:
    client = openai.OpenAI(base_url=f"{live.url}/v1", api_key="unused", timeout=300)
    if stream:
        chunks = client.chat.completions.create(
            model=model,
            messages=QUESTION,  # type: ignore[arg-type]
            max_tokens=12,
            temperature=0,
            stream=True,
        )
        return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    reply = client.chat.completions.create(
        model=model,
        messages=QUESTION,
        max_tokens=12,  # type: ignore[arg-type]
        temperature=0,
    )
    return reply.choices[0].message.content or ""


def test_merge_serve_chat_swap_and_in_engine(
    server: LiveServer, llama_triple_fp32: TinyTriple
) -> None:
    a = serve_merge(server, llama_triple_fp32, "vllm-a", dtype="float32")
    want_a = reference_greedy(Path(a["result"]["output"]), QUESTION, 12)
    assert ask(server, "vllm-a") == want_a
    assert ask(server, "vllm-a", stream=True) == want_a
    with server.client() as c:
        engines = c.get("/admin/engines").json()
    assert [e["engine"] for e in engines] == ["vllm"]

    b = serve_merge(server, llama_triple_fp32, "vllm-b", dtype="float32", alpha=0.5)
    want_b = reference_greedy(Path(b["result"]["output"]), QUESTION, 12)
    assert ask(server, "vllm-b") == want_b
    with server.client() as c:
        assert c.post("/admin/models/vllm-a/load").json()["how"] == "swapped in place"
    assert ask(server, "vllm-a") == want_a  # A -> B -> A: exactly A again

    serve_merge(
        server, llama_triple_fp32, "vllm-inline", dtype="float32", alpha=0.5, serve_mode="in_engine"
    )
    assert ask(server, "vllm-inline") == want_b  # merged inside the engine == written merge
    with server.client() as c:
        assert len(c.get("/admin/engines").json()) == 1  # every swap stayed in one engine
