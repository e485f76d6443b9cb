"""EnginePool: which model is loaded where; hot swaps under a lock; LRU eviction.

A request for a model runs only while the pool's per-engine readers lock is held
and the engine's loaded model id is the requested one, so no answer can come from
the wrong weights. A swap takes the lock exclusively: it waits for in-flight
generations, reloads in place (same architecture) and verifies a few parameters
before the model is marked ready.

A load that fails is remembered (:meth:`EnginePool.failure`) until a new load of that
model is requested, so requests get the reason at once instead of one doomed load
(or a bare 500) each.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from app.core.errors import ModelLoadFailedError, RealignError, ServiceUnavailableError
from app.engines.base import ChatEngine, InlineMerge
from app.engines.factory import EngineFactory
from app.engines.rwlock import RWLock
from app.residuals.manifest import verify_merged_dir

log = logging.getLogger("app.engines")
VERIFY_TENSOR = "model.norm.weight"


class ModelLoadingError(ServiceUnavailableError):
    """The model is being loaded; retry shortly."""

    code = "model_loading"

    def __init__(self, message: str, retry_after: int = 5) -> None:
        super().__init__(message)
        self.retry_after = retry_after


@dataclass(frozen=True)
class ModelSource:
    """What to load for a model id: a merged checkpoint, or an in-engine merge."""

    model_id: str
    path: Path  # the merged dir, or for in-engine merges the target (config/shapes)
    inline: InlineMerge | None = None


# Config fields an engine does not build anything from: tokens are the front end's.
_NOT_ENGINE = frozenset(
    {"_name_or_path", "transformers_version", "bos_token_id", "eos_token_id", "pad_token_id",
     "use_cache", "auto_map"}
)  # fmt: skip


def signature(model_dir: Path) -> str:
    """Models with equal signatures can swap weights in place in one engine.

    Everything else in ``config.json`` counts: an engine bakes more than shapes in at
    start (RoPE tables from ``rope_theta``/``rope_scaling``, its context length from
    ``max_position_embeddings``, norm epsilons), so Llama 3 -> 3.1 weights in a Llama 3
    engine would run with the wrong positions.
    """
    cfg = json.loads((model_dir / "config.json").read_text())
    return json.dumps({k: v for k, v in cfg.items() if k not in _NOT_ENGINE}, sort_keys=True)


@dataclass
class _Slot:
    engine: ChatEngine
    signature: str
    model_id: str
    lock: RWLock = field(default_factory=RWLock)
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    last_used: float = field(default_factory=time.monotonic)
    loads: int = 0


class EnginePool:
    """At most ``max_engines`` engines; models swap in place when shapes allow.

    Args:
        factory: builds an engine for a model directory.
        max_engines: memory budget, counted in engines.
        wait_s: how long a request waits for a loading model before a 503.
    """

    def __init__(self, factory: EngineFactory, max_engines: int = 1, wait_s: float = 30) -> None:
        self.factory = factory
        self.max_engines = max_engines
        self.wait_s = wait_s
        self._slots: list[_Slot] = []
        self._manage = asyncio.Lock()
        # model id -> (what failed to load, why); a model re-registered with other
        # weights (another source) is not held to the old failure.
        self._failures: dict[str, tuple[ModelSource, ModelLoadFailedError]] = {}

    def _find(self, model_id: str) -> _Slot | None:
        return next((s for s in self._slots if s.model_id == model_id), None)

    def loaded(self) -> dict[str, str]:
        """Model id -> state (``loading``, ``ready`` or ``failed``)."""
        states = dict.fromkeys(self._failures, "failed")
        states.update({s.model_id: "ready" if s.ready.is_set() else "loading" for s in self._slots})
        return states

    def failure(self, src: ModelSource) -> ModelLoadFailedError | None:
        """Why the last load of ``src`` failed, until a new load is requested."""
        failed = self._failures.get(src.model_id)
        return failed[1] if failed is not None and failed[0] == src else None

    @contextlib.asynccontextmanager
    async def use(self, model_id: str) -> AsyncIterator[ChatEngine]:
        """Hold the engine serving ``model_id`` for one request.

        Raises:
            ModelLoadingError: not ready within ``wait_s`` (or not loaded at all).
            ModelLoadFailedError: its last load failed.
        """
        deadline = time.monotonic() + self.wait_s
        while True:
            slot = self._find(model_id)
            if slot is None:
                failed = self._failures.get(model_id)
                if failed is not None:
                    raise ModelLoadFailedError(model_id, failed[1].reason)
                raise ModelLoadingError(
                    f"model {model_id!r} is not loaded; an admin can load "
                    f"it with POST /admin/models/{model_id}/load"
                )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(slot.ready.wait(), max(0.0, deadline - time.monotonic()))
            async with slot.lock.read():
                if slot.model_id == model_id and slot.ready.is_set():
                    slot.last_used = time.monotonic()
                    yield slot.engine
                    return
            if time.monotonic() >= deadline:
                raise ModelLoadingError(f"model {model_id!r} is loading; retry shortly")

    async def load(self, src: ModelSource) -> str:
        """Make ``src`` ready: in place in an engine of the same shape, else in a new engine
        (evicting the least recently used one beyond the budget). Returns how.

        Raises:
            ModelLoadFailedError: the engine could not load it (also remembered, see
                :meth:`failure`, until the next call for this model).
        """
        self._failures.pop(src.model_id, None)
        try:
            return await self._load(src)
        except Exception as exc:
            failed = ModelLoadFailedError(src.model_id, load_reason(exc))
            self._failures[src.model_id] = (src, failed)
            log.warning("loading %s failed: %s", src.model_id, failed.reason, exc_info=exc)
            raise failed from exc

    async def _load(self, src: ModelSource) -> str:
        async with self._manage:
            current = self._find(src.model_id)
            if current is not None and src.inline is None:
                return "already loaded"
            # Serve only what was published: a byte changed since fails the load.
            await asyncio.to_thread(verify_merged_dir, src.path)
            sig = signature(src.path)
            same = sorted((s for s in self._slots if s.signature == sig), key=lambda s: s.last_used)
            if same:
                await self._swap(same[0], src)
                return "swapped in place"
            while len(self._slots) >= self.max_engines:
                await self._evict(min(self._slots, key=lambda s: s.last_used))
            await self._start(src, sig)
            return "started a new engine"

    async def _swap(self, slot: _Slot, src: ModelSource) -> None:
        started = time.perf_counter()
        async with slot.lock.write():
            slot.ready.clear()
            old, slot.model_id = slot.model_id, src.model_id
            try:
                if src.inline is not None:
                    await slot.engine.reload_merged(src.inline)
                else:
                    await slot.engine.reload(src.path)
                await self._verify(slot.engine, src)
            except BaseException:
                self._slots.remove(slot)  # weights are in an unknown state: drop the engine
                await slot.engine.close()
                raise
            slot.loads += 1
            slot.ready.set()
        log.info(
            "swapped %s -> %s in place in %.3f s", old, src.model_id, time.perf_counter() - started
        )

    async def _start(self, src: ModelSource, sig: str) -> None:
        started = time.perf_counter()
        engine = self.factory(src.path)
        slot = _Slot(engine, sig, src.model_id)
        self._slots.append(slot)
        try:
            await engine.start()
            if src.inline is not None:
                await engine.reload_merged(src.inline)
            await self._verify(engine, src)
        except BaseException:
            self._slots.remove(slot)
            await engine.close()
            raise
        slot.ready.set()
        log.info(
            "started %s engine for %s in %.1f s",
            engine.kind,
            src.model_id,
            time.perf_counter() - started,
        )

    async def _evict(self, slot: _Slot) -> None:
        async with slot.lock.write():
            self._slots.remove(slot)
            await slot.engine.close()
        log.info("evicted %s (least recently used)", slot.model_id)

    async def unload(self, model_id: str) -> bool:
        self._failures.pop(model_id, None)
        async with self._manage:
            slot = self._find(model_id)
            if slot is None:
                return False
            await self._evict(slot)
            return True

    async def close(self) -> None:
        for slot in list(self._slots):
            await self._evict(slot)

    async def _verify(self, engine: ChatEngine, src: ModelSource) -> None:
        checksum = getattr(engine, "checksum", None)
        if checksum is None:
            return
        expected = _expected_checksum(src)
        if expected is None:
            return
        got = (await checksum([VERIFY_TENSOR])).get(VERIFY_TENSOR)
        if got is not None and abs(got - expected) > 1e-3 * max(1.0, abs(expected)):
            raise ServiceUnavailableError(
                f"{src.model_id}: weights after the swap do not match the checkpoint "
                f"({VERIFY_TENSOR} sum {got} vs {expected}); the engine was dropped"
            )


def _expected_checksum(src: ModelSource) -> float | None:
    from app.residuals.checkpoint import Checkpoint
    from app.residuals.inline import stream_merged

    if src.inline is not None:
        i = src.inline
        for _, t in stream_merged(i.residual_dir, i.target_dir, i.alpha, names={VERIFY_TENSOR}):
            return float(t.double().sum())
        return None
    with Checkpoint.open(src.path) as ckpt:
        info = ckpt.tensors.get(VERIFY_TENSOR)
        if info is None:
            return None
        import torch

        buf = torch.empty(info.nbytes, dtype=torch.uint8)
        ckpt.read_into(info, 0, info.rows, memoryview(buf.numpy()))  # type: ignore[arg-type]
        return float(buf.view(info.dtype.torch).double().sum())


def load_reason(exc: BaseException) -> str:
    """One line saying why a load failed: our message, or the engine's error and its
    first line (no traceback), cut to a readable length."""
    if isinstance(exc, ModelLoadFailedError):
        return exc.reason
    if isinstance(exc, RealignError):
        text = exc.message
    else:
        first = (str(exc).strip().splitlines() or [""])[0]
        text = f"{type(exc).__name__}: {first}" if first else type(exc).__name__
    return text if len(text) <= 400 else text[:397] + "..."


def describe(pool: EnginePool) -> list[dict[str, Any]]:
    """Admin view of the engines."""
    return [
        {
            "model": s.model_id,
            "engine": s.engine.kind,
            "architecture": s.engine.architecture,
            "state": "ready" if s.ready.is_set() else "loading",
            "swaps": s.loads,
        }
        for s in pool._slots
    ]
