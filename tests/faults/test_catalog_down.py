"""The model catalog (Redis) goes down under a serving replica: the models it has loaded
keep answering, a model it has not loaded gets a 503 that names the records, and it
serves on once Redis is back. Real redis-server (stopped and started), real TorchEngine."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from app.core.errors import RecordsUnavailableError
from app.core.settings import Settings
from app.demo.tiny import TinyTriple
from app.handoff.board import LoadBoard
from app.handoff.entry import ModelEntry
from app.jobs.kv import RedisKV
from app.merge import merge_to_store
from app.serving.protocol import ChatCompletionRequest
from app.serving.service import ServingService
from app.store.local import LocalStore
from tests.jobs.conftest import RedisServer

QUESTION = [{"role": "user", "content": "What is the capital of the country?"}]


def test_loaded_models_answer_while_the_catalog_is_down(
    redis_server: RedisServer, llama_triple_fp32: TinyTriple, tmp_path: Path
) -> None:
    t = llama_triple_fp32
    store = LocalStore(tmp_path / "store")
    settings = Settings(models_cache_dir=store.root, engine="torch", redis_url=redis_server.url)
    board = LoadBoard(RedisKV(redis_server.url))
    for name, alpha in (("loaded", 1.0), ("other", 0.5)):
        m = merge_to_store(
            base=str(t.base), instruct=str(t.instruct), target=str(t.new_base), alpha=alpha,
            dtype="float32", store=store,
        )  # fmt: skip
        entry = ModelEntry(
            id=name, merged_key=m.key, residual_key=m.residual_key, alpha=alpha,
            base="b", instruct="i", target="t", owner="o", job_id="j",
        )  # fmt: skip
        board.register_model(entry)

    def body(model: str) -> ChatCompletionRequest:
        return ChatCompletionRequest(model=model, messages=QUESTION, max_tokens=6, temperature=0)

    async def ask(serving: ServingService, model: str) -> str:
        done = await serving.chat(body(model))
        return done.choices[0].message.content or ""  # type: ignore[union-attr]

    async def run() -> None:
        serving = ServingService(settings, board, store=store)
        before = await ask(serving, "loaded")
        redis_server.stop()
        try:
            assert await ask(serving, "loaded") == before
            with pytest.raises(RecordsUnavailableError):
                await ask(serving, "other")
        finally:
            redis_server.start()
        assert await ask(serving, "other")
        await serving.stop()

    asyncio.run(run())
