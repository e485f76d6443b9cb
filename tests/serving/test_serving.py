"""OpenAI-compatible serving on the embedded default (TorchEngine), through the real
`openai` client: merge with serve=true, chat, stream, hot swap, errors."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from app.api.app import create_app
from app.core.settings import Settings
from app.demo.tiny import TinyTriple
from tests.api.live import LiveServer, merge_body, wait_for

pytestmark = pytest.mark.slow
QUESTION = [{"role": "user", "content": "What is the capital of the country?"}]


@pytest.fixture(scope="module")
def server(
    tmp_path_factory: pytest.TempPathFactory, llama_triple_fp32: TinyTriple, qwen_triple: TinyTriple
) -> Iterator[LiveServer]:
    store = tmp_path_factory.mktemp("serving_store")
    settings = Settings(
        models_cache_dir=store,
        engine="torch",
        engine_wait_s=60,
        allowed_roots=[llama_triple_fp32.base.parent, qwen_triple.base.parent],
    )
    with LiveServer(create_app(settings)) as live:
        yield live


def reference_greedy(model_dir: Path, messages: list[dict[str, str]], n: int) -> str:
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids = tok(text, return_tensors="pt", add_special_tokens=False).input_ids
    gen = json.loads((model_dir / "generation_config.json").read_text())
    eos = gen["eos_token_id"]
    out = model.generate(
        ids, max_new_tokens=n, do_sample=False, eos_token_id=eos, pad_token_id=tok.pad_token_id or 0
    )
    return str(tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True))


def serve_merge(live: LiveServer, triple: TinyTriple, name: str, **extra: object) -> dict:
    with live.client() as c:
        job = c.post("/v1/merges", json=merge_body(triple, serve=True, name=name, **extra)).json()
        done = wait_for(c, job["id"], timeout=180)
    assert done["status"] == "succeeded", done["error"]
    return done


def test_merge_then_chat_matches_transformers(
    server: LiveServer, llama_triple_fp32: TinyTriple
) -> None:
    done = serve_merge(server, llama_triple_fp32, "tiny-a")
    assert done["stage"] == "load"
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused")
    reply = client.chat.completions.create(
        model="tiny-a",
        messages=QUESTION,  # type: ignore[arg-type]
        max_tokens=12,
        temperature=0,
    )
    want = reference_greedy(Path(done["result"]["output"]), QUESTION, 12)
    assert reply.choices[0].message.content == want
    assert reply.usage is not None and reply.usage.completion_tokens > 0
    assert reply.choices[0].finish_reason in ("stop", "length")
    models = {m.id: m for m in client.models.list().data}
    assert "tiny-a" in models
    prov = models["tiny-a"].model_extra["realign"]  # type: ignore[index]
    assert prov["residual_key"] and prov["alpha"] == 1.0 and prov["state"] == "ready"


def test_streaming_chunks(server: LiveServer, llama_triple_fp32: TinyTriple) -> None:
    serve_merge(server, llama_triple_fp32, "tiny-a")
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused")
    whole = client.chat.completions.create(
        model="tiny-a",
        messages=QUESTION,  # type: ignore[arg-type]
        max_tokens=10,
        temperature=0,
    )
    chunks = list(
        client.chat.completions.create(
            model="tiny-a",
            messages=QUESTION,
            max_tokens=10,
            temperature=0,
            stream=True,  # type: ignore[arg-type]
            stream_options={"include_usage": True},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] in ("stop", "length") and all(f is None for f in finishes[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert all(c.id == chunks[0].id for c in chunks)
    with (
        server.client() as c,
        c.stream(
            "POST",
            "/v1/chat/completions",
            json={"model": "tiny-a", "messages": QUESTION, "max_tokens": 3, "stream": True},
        ) as r,
    ):
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]" and all(x.startswith("data: ") for x in lines)


def test_swap_a_b_a_returns_exact_outputs(
    server: LiveServer, llama_triple_fp32: TinyTriple, tmp_path: Path
) -> None:
    serve_merge(server, llama_triple_fp32, "tiny-a")
    serve_merge(server, llama_triple_fp32, "tiny-b", alpha=0.5)
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused")

    def ask(model: str) -> str:
        r = client.chat.completions.create(
            model=model,
            messages=QUESTION,
            max_tokens=8,  # type: ignore[arg-type]
            temperature=0,
        )
        return r.choices[0].message.content or ""

    with server.client() as c:
        assert c.post("/admin/models/tiny-a/load").json()["status"] == "ready"
        a1 = ask("tiny-a")
        how = c.post("/admin/models/tiny-b/load").json()["how"]
        assert how == "swapped in place"
        b = ask("tiny-b")
        c.post("/admin/models/tiny-a/load")
        a2 = ask("tiny-a")
    assert a1 == a2
    assert b != a1


def test_a_model_with_other_positions_gets_its_own_engine(
    server: LiveServer, llama_triple_fp32: TinyTriple
) -> None:
    """Same shapes, another rope_theta: an in-place swap would keep the old engine's
    RoPE tables, so the pool starts a new engine and the answer matches transformers."""
    t = llama_triple_fp32
    rope = t.new_base.parent / "new_base_rope"
    if not rope.exists():
        shutil.copytree(t.new_base, rope)
        cfg = json.loads((rope / "config.json").read_text())
        cfg["rope_theta"] = 4 * float(cfg.get("rope_theta") or 10000.0)
        (rope / "config.json").write_text(json.dumps(cfg))
    serve_merge(server, t, "tiny-a")
    done = serve_merge(server, dataclasses.replace(t, new_base=rope), "tiny-rope")
    with server.client() as c:
        assert c.post("/admin/models/tiny-a/load").json()["status"] == "ready"
        assert c.post("/admin/models/tiny-rope/load").json()["how"] == "started a new engine"
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused")
    reply = client.chat.completions.create(
        model="tiny-rope",
        messages=QUESTION,  # type: ignore[arg-type]
        max_tokens=8,
        temperature=0,
    )
    assert reply.choices[0].message.content == reference_greedy(
        Path(done["result"]["output"]), QUESTION, 8
    )


def test_concurrent_requests_during_swaps_never_mix_weights(
    server: LiveServer, llama_triple_fp32: TinyTriple
) -> None:
    serve_merge(server, llama_triple_fp32, "tiny-a")
    serve_merge(server, llama_triple_fp32, "tiny-b", alpha=0.5)
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=5)
    expected = {}
    for model in ("tiny-a", "tiny-b"):
        with server.client() as c:
            c.post(f"/admin/models/{model}/load")
        expected[model] = (
            client.chat.completions.create(
                model=model,
                messages=QUESTION,
                max_tokens=6,
                temperature=0,  # type: ignore[arg-type]
            )
            .choices[0]
            .message.content
        )
    results: list[tuple[str, str]] = []

    def worker(model: str) -> None:
        for _ in range(3):
            r = client.chat.completions.create(
                model=model,
                messages=QUESTION,
                max_tokens=6,  # type: ignore[arg-type]
                temperature=0,
            )
            results.append((model, r.choices[0].message.content or ""))

    threads = [threading.Thread(target=worker, args=(m,)) for m in ("tiny-a", "tiny-b") * 2]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 12
    assert all(text == expected[model] for model, text in results)


def test_errors_are_openai_shaped(server: LiveServer, llama_triple_fp32: TinyTriple) -> None:
    serve_merge(server, llama_triple_fp32, "tiny-a")
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.NotFoundError) as exc:
        client.chat.completions.create(model="nope", messages=QUESTION)  # type: ignore[arg-type]
    assert exc.value.code == "model_not_found"
    long = [{"role": "user", "content": "word " * 3000}]
    with pytest.raises(openai.BadRequestError) as too_long:
        client.chat.completions.create(model="tiny-a", messages=long)  # type: ignore[arg-type]
    assert too_long.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as empty:  # OpenAI's 400, naming the param
        client.chat.completions.create(model="tiny-a", messages=[])  # type: ignore[arg-type]
    assert empty.value.status_code == 400 and empty.value.param == "messages"
    assert empty.value.type == "invalid_request_error"


def test_in_engine_merge_equals_checkpoint(
    server: LiveServer, llama_triple_fp32: TinyTriple
) -> None:
    serve_merge(server, llama_triple_fp32, "tiny-ckpt", dtype="float32")
    serve_merge(server, llama_triple_fp32, "tiny-inline", dtype="float32", serve_mode="in_engine")
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused")
    outs = []
    for model in ("tiny-ckpt", "tiny-inline"):
        with server.client() as c:
            c.post(f"/admin/models/{model}/load")
        outs.append(
            client.chat.completions.create(
                model=model,
                messages=QUESTION,
                max_tokens=10,
                temperature=0,  # type: ignore[arg-type]
            )
            .choices[0]
            .message.content
        )
    assert outs[0] == outs[1]


def test_engine_protocol_sampling_is_seeded(llama_triple_fp32: TinyTriple) -> None:
    from app.engines.base import GenerationRequest
    from app.engines.hf import TorchEngine

    async def run() -> list[list[int]]:
        engine = TorchEngine(llama_triple_fp32.instruct)
        await engine.start()
        req = GenerationRequest([1, 2, 3], max_tokens=5, temperature=0.9, top_p=0.9, seed=3, n=2)
        outs = []
        for _ in range(2):
            ids: dict[int, list[int]] = {0: [], 1: []}
            async for chunk in engine.generate(req):
                ids[chunk.index] += chunk.token_ids
            outs.append(ids[0] + [-1] + ids[1])
        await engine.close()
        return outs

    first, second = asyncio.run(run())
    assert first == second and torch.tensor(first).numel() == 11
