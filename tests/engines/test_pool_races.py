"""Requests racing the engine pool's evictions and swaps, and a model id registered again
with other weights: a request never runs on a closed engine or on weights it was not
prepared for, and a re-registered id serves its new weights. Real TorchEngine, real
LocalStore, the catalog on SQLite, tiny models."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from app.core.settings import Settings
from app.demo.tiny import TinyTriple
from app.engines.factory import factory_from_settings
from app.engines.pool import EnginePool, ModelLoadingError, describe
from app.handoff.board import LoadBoard
from app.handoff.entry import ModelEntry
from app.jobs.sqlite_kv import SqliteKV
from app.merge import merge_to_store
from app.pipeline.stored import StoredMerge
from app.serving.protocol import ChatCompletion, ChatCompletionRequest
from app.serving.service import ServingService
from app.serving.sources import source_of
from app.store.local import LocalStore

QUESTION = [{"role": "user", "content": "What is the capital of the country?"}]


def entry(model_id: str, merged: StoredMerge) -> ModelEntry:
    return ModelEntry(
        id=model_id, merged_key=merged.key, residual_key=merged.residual_key, alpha=1.0,
        base="b", instruct="i", target="t", owner="o", job_id="j",
    )  # fmt: skip


def merged(store: LocalStore, t: TinyTriple, alpha: float = 1.0) -> StoredMerge:
    return merge_to_store(
        base=str(t.base), instruct=str(t.instruct), target=str(t.new_base), alpha=alpha,
        dtype="float32", store=store,
    )  # fmt: skip


async def until(check: object, what: str) -> None:
    for _ in range(2000):
        if callable(check) and check():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"never: {what}")


async def in_flight(pool: EnginePool, model: str, leave: asyncio.Event) -> asyncio.Task[None]:
    """A request holding ``model``'s engine until ``leave`` is set (once it holds it)."""
    inside = asyncio.Event()

    async def hold() -> None:
        async with pool.use(model):
            inside.set()
            await leave.wait()

    task = asyncio.create_task(hold())
    await inside.wait()
    return task


def test_a_request_waiting_while_its_engine_is_evicted_gets_503_not_a_closed_engine(
    llama_triple_fp32: TinyTriple, qwen_triple: TinyTriple, tmp_path: Path
) -> None:
    store = LocalStore(tmp_path / "store")
    a, q = merged(store, llama_triple_fp32), merged(store, qwen_triple)
    settings = Settings(models_cache_dir=store.root, engine="torch")

    async def run() -> None:
        pool = EnginePool(factory_from_settings(settings), max_engines=1, wait_s=5)
        await pool.load(source_of(entry("a", a), store))
        leave = asyncio.Event()
        first = await in_flight(pool, "a", leave)  # a generation in flight on "a"
        # another architecture needs the only engine: its eviction waits for "a"'s reader
        loading = asyncio.create_task(pool.load(source_of(entry("q", q), store)))
        slot = pool._slots[0]
        await until(lambda: slot.lock._waiting_writers == 1, "the eviction waits")

        async def late() -> object:  # arrives while the eviction waits: queued behind it
            async with pool.use("a") as engine:
                return engine

        second = asyncio.create_task(late())
        await asyncio.sleep(0.1)
        leave.set()
        await first
        assert await loading == "started a new engine"
        with pytest.raises(ModelLoadingError, match="not loaded"):
            await second
        await pool.close()

    asyncio.run(run())


def test_a_request_prepared_for_swapped_out_weights_is_refused(
    llama_triple_fp32: TinyTriple, tmp_path: Path
) -> None:
    """The prompt was tokenized for version 1 of a model id; version 2 was swapped in
    before the request got the engine: it is refused (retry), not run on version 2."""
    store = LocalStore(tmp_path / "store")
    v1, v2 = merged(store, llama_triple_fp32), merged(store, llama_triple_fp32, alpha=0.5)
    settings = Settings(models_cache_dir=store.root, engine="torch")

    async def run() -> None:
        pool = EnginePool(factory_from_settings(settings))
        await pool.load(source_of(entry("x", v1), store))
        prepared = pool.local("x")
        async with pool.use("x", prepared):  # unchanged: served
            pass
        assert await pool.load(source_of(entry("x", v2), store)) == "swapped in place"
        assert pool.holds(source_of(entry("x", v2), store))
        assert not pool.holds(source_of(entry("x", v1), store))
        with pytest.raises(ModelLoadingError, match="replaced by other weights"):
            async with pool.use("x", prepared):
                pass
        async with pool.use("x", pool.local("x")):
            pass
        await pool.close()

    asyncio.run(run())


def test_a_model_id_registered_again_serves_its_new_weights(
    llama_triple_fp32: TinyTriple, tmp_path: Path
) -> None:
    """No load notice reaches this replica (it missed it): its first request after the id
    was registered with other weights loads them instead of answering from the old ones."""
    store = LocalStore(tmp_path / "store")
    v1, v2 = merged(store, llama_triple_fp32), merged(store, llama_triple_fp32, alpha=0.5)
    settings = Settings(models_cache_dir=store.root, engine="torch")
    board = LoadBoard(SqliteKV(tmp_path / "records.sqlite"))
    body = ChatCompletionRequest(model="x", messages=QUESTION, max_tokens=8, temperature=0)

    async def ask(serving: ServingService) -> str:
        done = await serving.chat(body)
        return done.choices[0].message.content or ""  # type: ignore[union-attr]

    async def run() -> tuple[str, str, str]:
        serving = ServingService(settings, board, store=store)
        board.register_model(entry("x", v1))
        first = await ask(serving)
        board.register_model(entry("x", v2))
        second = await ask(serving)
        assert serving.pool.holds(serving.source(entry("x", v2)))
        assert [e["swaps"] for e in serving.engines()] == [1]
        await serving.stop()
        fresh = ServingService(settings, board, store=store)  # v2 loaded from scratch
        expected = await ask(fresh)
        await fresh.stop()
        return first, second, expected

    first, second, expected = asyncio.run(run())
    assert second == expected
    assert first != second


def test_closing_the_pool_during_a_load_leaves_no_engine_running(
    llama_triple_fp32: TinyTriple, tmp_path: Path
) -> None:
    store = LocalStore(tmp_path / "store")
    a = merged(store, llama_triple_fp32)
    settings = Settings(models_cache_dir=store.root, engine="torch")

    async def run() -> None:
        pool = EnginePool(factory_from_settings(settings))
        loading = asyncio.create_task(pool.load(source_of(entry("a", a), store)))
        await asyncio.sleep(0)  # the load has begun
        await pool.close()  # shutdown meanwhile
        assert loading.done() and await loading == "started a new engine"
        assert describe(pool) == [] and pool.local("a") is None

    asyncio.run(run())


def test_a_request_behind_a_waiting_swap_gets_503_within_the_wait(
    llama_triple_fp32: TinyTriple, tmp_path: Path
) -> None:
    """A long generation holds model "a"; a swap of its engine to "b" waits for it; a new
    request for "a" meanwhile gets 503 after REALIGN_ENGINE_WAIT_S, not a stall as long
    as that generation."""
    store = LocalStore(tmp_path / "store")
    a, b = merged(store, llama_triple_fp32), merged(store, llama_triple_fp32, alpha=0.5)
    settings = Settings(models_cache_dir=store.root, engine="torch")

    async def run() -> None:
        pool = EnginePool(factory_from_settings(settings), max_engines=1, wait_s=0.5)
        await pool.load(source_of(entry("a", a), store))
        leave = asyncio.Event()
        first = await in_flight(pool, "a", leave)  # a generation in flight on "a"
        swapping = asyncio.create_task(pool.load(source_of(entry("b", b), store)))
        slot = pool._slots[0]
        await until(lambda: slot.lock._waiting_writers == 1, "the swap waits")
        started = time.monotonic()
        with pytest.raises(ModelLoadingError, match="retry shortly"):
            async with pool.use("a"):
                pass
        assert time.monotonic() - started < 3
        leave.set()
        await first
        assert await swapping == "swapped in place"
        await pool.close()

    asyncio.run(run())


def test_a_stream_gets_its_engine_before_the_status_line(
    llama_triple_fp32: TinyTriple, tmp_path: Path
) -> None:
    """A streamed chat request that cannot get its engine (a swap waits on a long
    generation) fails before its first event, so the route answers 503 with Retry-After
    rather than 200 with an error event; a stream dropped unread lets its engine go."""
    store = LocalStore(tmp_path / "store")
    a, b = merged(store, llama_triple_fp32), merged(store, llama_triple_fp32, alpha=0.5)
    settings = Settings(models_cache_dir=store.root, engine="torch", engine_wait_s=0.5)
    board = LoadBoard(SqliteKV(tmp_path / "records.sqlite"))
    body = ChatCompletionRequest(
        model="a", messages=QUESTION, max_tokens=4, temperature=0, stream=True
    )

    async def run() -> None:
        serving = ServingService(settings, board, store=store)
        board.register_model(entry("a", a))
        events = await serving.chat(body)
        assert not isinstance(events, ChatCompletion)
        got = [e async for e in events]  # type: ignore[union-attr]
        assert got[0].startswith("data: {") and '"role":"assistant"' in got[0]
        assert got[-1] == "data: [DONE]\n\n" and not any('"error"' in e for e in got)

        pool = serving.pool
        leave = asyncio.Event()
        first = await in_flight(pool, "a", leave)
        swapping = asyncio.create_task(pool.load(serving.source(entry("b", b))))
        await until(lambda: pool._slots[0].lock._waiting_writers == 1, "the swap waits")
        with pytest.raises(ModelLoadingError, match="retry shortly"):
            await serving.chat(body)  # no generator handed out: nothing was sent
        leave.set()
        await first
        assert await swapping == "swapped in place"

        board.register_model(entry("a", a))
        unread = await serving.chat(body)  # holds "a"'s engine (after "b" was swapped out)
        del unread  # the client went away before the first byte
        await asyncio.sleep(0.05)  # the loop's finalizer closes the generator
        assert await pool.load(serving.source(entry("b", b))) == "swapped in place"
        await serving.stop()

    asyncio.run(run())
