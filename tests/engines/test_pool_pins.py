"""The engine pool holds a store pin on the files of every model an engine holds: the
store cannot remove (or its LRU evict) them while loaded, and can once the model is
swapped out or unloaded. Real TorchEngine, real LocalStore, tiny float32 Llama models."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from app.core.errors import ArtifactInUseError
from app.core.settings import Settings
from app.demo.tiny import TinyTriple
from app.engines.factory import factory_from_settings
from app.engines.pool import EnginePool
from app.handoff.entry import ModelEntry
from app.merge import merge_to_store
from app.serving.sources import source_of
from app.store.local import LocalStore


def entry(model_id: str, merged_key: str, residual_key: str) -> ModelEntry:
    return ModelEntry(
        id=model_id, merged_key=merged_key, residual_key=residual_key, alpha=1.0, base="b",
        instruct="i", target="t", owner="o", job_id="j",
    )  # fmt: skip


def held(store: LocalStore, key: str) -> bool:
    return next(a.in_use for a in store.artifacts("merged") if a.key == key)


def test_a_loaded_model_stays_pinned_until_swapped_out_or_unloaded(
    llama_triple_fp32: TinyTriple, tmp_path: Path
) -> None:
    t = llama_triple_fp32
    store = LocalStore(tmp_path / "store")
    a, b = (
        merge_to_store(base=str(t.base), instruct=str(t.instruct), target=str(t.new_base),
                       alpha=alpha, dtype="float32", store=store)
        for alpha in (0.5, 1.0)
    )  # fmt: skip
    settings = Settings(models_cache_dir=store.root, engine="torch")

    async def run() -> None:
        pool = EnginePool(factory_from_settings(settings))
        src_a = source_of(entry("a", a.key, a.residual_key), store)
        assert await pool.load(src_a) == "started a new engine"
        assert pool.local("a") is not None and pool.local("a").path == a.path  # type: ignore[union-attr]
        assert held(store, a.key) and not held(store, b.key)
        with pytest.raises(ArtifactInUseError):
            store.remove(a.key, "merged")

        assert await pool.load(src_a) == "already loaded"
        src_b = source_of(entry("b", b.key, b.residual_key), store)
        assert await pool.load(src_b) == "swapped in place"
        assert held(store, b.key) and not held(store, a.key)  # a's pin went with a
        store.budget_bytes = 0  # LRU eviction takes all it may: not the loaded model
        removed = store.evict()
        assert a.key in removed and b.key not in removed and b.path.is_dir()

        assert await pool.unload("b")
        assert not held(store, b.key)
        assert store.evict() == [b.key]
        await pool.close()

    asyncio.run(run())
