"""EnginePool: which model is loaded where; hot swaps under a lock; LRU eviction.

A request for a model runs only while the pool's per-engine readers lock is held
and the engine's loaded model id is the requested one, so no answer can come from
the wrong weights. A swap takes the lock exclusively: it waits for in-flight
generations, reloads in place (same architecture) and verifies a few parameters
before the model is marked ready.

Weights are opened through their :class:`~app.engines.source.ModelSource` (fetched
into the node cache when they come from a shared store) and stay pinned while an
engine holds them: the pin is released when the model is swapped out, evicted or
unloaded, so node-cache eviction never deletes files a loaded model came from (vLLM
may read them again, e.g. a restart after a swap failed).

A load that fails is remembered (:meth:`EnginePool.failure`) until a new load of that
model is requested, so requests get the reason at once instead of one doomed load
(or a bare 500) each.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from app.core.errors import ModelLoadFailedError, RealignError, ServiceUnavailableError
from app.engines.base import ChatEngine
from app.engines.factory import EngineFactory
from app.engines.rwlock import RWLock
from app.engines.source import (
    VERIFY_TENSOR,
    LocalModel,
    ModelSource,
    expected_checksum,
    signature,
)
from app.residuals.manifest import verify_merged_dir

__all__ = ["EnginePool", "LocalModel", "ModelLoadingError", "ModelSource", "describe"]
log = logging.getLogger("app.engines")


class ModelLoadingError(ServiceUnavailableError):
    """The model is being loaded; retry shortly."""

    code = "model_loading"

    def __init__(self, message: str, retry_after: int = 5) -> None:
        super().__init__(message)
        self.retry_after = retry_after


@dataclass
class _Slot:
    engine: ChatEngine
    signature: str
    source: ModelSource
    local: LocalModel
    pin: contextlib.ExitStack  # the store's hold on ``local`` (released with the model)
    lock: RWLock = field(default_factory=RWLock)
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    last_used: float = field(default_factory=time.monotonic)
    loads: int = 0

    @property
    def model_id(self) -> str:
        return self.source.model_id


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

    def local(self, model_id: str) -> LocalModel | None:
        """Where the weights of loaded ``model_id`` are on this node (pinned), or None."""
        slot = self._find(model_id)
        return slot.local if slot is not None else None

    def failure(self, src: ModelSource) -> ModelLoadFailedError | None:
        """Why the last load of ``src`` failed, until a new load is requested."""
        failed = self._failures.get(src.model_id)
        return failed[1] if failed is not None and failed[0] == src else None

    def holds(self, src: ModelSource) -> bool:
        """Whether the weights of ``src`` are loaded and ready (not another version of its
        model id)."""
        slot = self._find(src.model_id)
        return slot is not None and slot.ready.is_set() and slot.source == src

    @contextlib.asynccontextmanager
    async def use(
        self, model_id: str, local: LocalModel | None = None
    ) -> AsyncIterator[ChatEngine]:
        """Hold the engine serving ``model_id`` for one request.

        Args:
            local: the weights the request was prepared for (:meth:`local` when its
                prompt was tokenized); another version swapped in meanwhile fails it.

        Raises:
            ModelLoadingError: not ready within ``wait_s`` (or not loaded at all), or
                replaced by other weights since ``local``.
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
            held = False
            try:  # a swap or eviction waiting for in-flight requests holds new ones off
                async with slot.lock.read(max(0.0, deadline - time.monotonic())):
                    held = True
                    # Re-checked under the lock: while this request waited for it, the slot
                    # may have been swapped to other weights, or evicted and its engine closed.
                    if slot.ready.is_set() and slot in self._slots and slot.model_id == model_id:
                        if local is not None and slot.local is not local:
                            raise ModelLoadingError(
                                f"model {model_id!r} was replaced by other weights while "
                                "this request waited; send it again",
                                retry_after=1,
                            )
                        slot.last_used = time.monotonic()
                        yield slot.engine
                        return
            except TimeoutError:
                if held:
                    raise  # the request's own
            if time.monotonic() >= deadline:
                raise ModelLoadingError(f"model {model_id!r} is loading; retry shortly")

    async def load(self, src: ModelSource) -> str:
        """Make ``src`` ready: in place in an engine of the same shape, else in a new engine
        (evicting the least recently used one beyond the budget). Returns how.

        Raises:
            ModelLoadFailedError: its weights could not be fetched or checked, or the
                engine could not load them (also remembered, see :meth:`failure`, until
                the next call for this model).
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
            if current is not None and current.source == src:
                return "already loaded"
            pin = contextlib.ExitStack()
            try:
                # Fetched (and checked while read) into the node cache, pinned there.
                local = await asyncio.to_thread(lambda: pin.enter_context(src.open()))
                # Serve only what was published: a byte changed since fails the load.
                await asyncio.to_thread(verify_merged_dir, local.path)
                return await self._place(src, local, pin, current)
            except BaseException:
                pin.close()
                raise

    async def _place(
        self, src: ModelSource, local: LocalModel, pin: contextlib.ExitStack, current: _Slot | None
    ) -> str:
        """Put opened weights in an engine: the one holding an older version of this model
        or another model of the same shape (in place), else a new one."""
        sig = signature(local.path)
        if current is not None and current.signature != sig:
            await self._evict(current)  # other weights under this id, of another shape
            current = None
        same = sorted(
            (s for s in self._slots if s.signature == sig),
            key=lambda s: (s is not current, s.last_used),
        )
        if same:
            await self._swap(same[0], src, local, pin)
            return "swapped in place"
        while len(self._slots) >= self.max_engines:
            await self._evict(min(self._slots, key=lambda s: s.last_used))
        await self._start(src, local, pin, sig)
        return "started a new engine"

    async def _swap(
        self, slot: _Slot, src: ModelSource, local: LocalModel, pin: contextlib.ExitStack
    ) -> None:
        started = time.perf_counter()
        async with slot.lock.write():
            slot.ready.clear()
            old = slot.source
            slot.source, slot.local = src, local
            try:
                if local.inline is not None:
                    await slot.engine.reload_merged(local.inline)
                else:
                    await slot.engine.reload(local.path)
                await self._verify(slot.engine, src.model_id, local)
            except BaseException:
                self._slots.remove(slot)  # weights are in an unknown state: drop the engine
                await slot.engine.close()
                slot.pin.close()
                raise
            slot.pin.close()  # the old model's files may go now
            slot.pin = pin
            slot.loads += 1
            slot.ready.set()
        took = time.perf_counter() - started
        log.info("swapped %s -> %s in place in %.3f s", old.model_id, src.model_id, took)

    async def _start(
        self, src: ModelSource, local: LocalModel, pin: contextlib.ExitStack, sig: str
    ) -> None:
        started = time.perf_counter()
        engine = self.factory(local.path)
        slot = _Slot(engine, sig, src, local, pin)
        self._slots.append(slot)
        try:
            await engine.start()
            if local.inline is not None:
                await engine.reload_merged(local.inline)
            await self._verify(engine, src.model_id, local)
        except BaseException:
            self._slots.remove(slot)
            await engine.close()
            raise
        slot.ready.set()
        took = time.perf_counter() - started
        log.info("started %s engine for %s in %.1f s", engine.kind, src.model_id, took)

    async def _evict(self, slot: _Slot) -> None:
        async with slot.lock.write():
            slot.ready.clear()  # requests waiting for this slot's lock must not take it
            self._slots.remove(slot)
            await slot.engine.close()
            slot.pin.close()
        log.info("evicted %s (least recently used)", slot.model_id)

    async def drop(self, src: ModelSource, failed: ModelLoadFailedError) -> None:
        """Take loaded ``src`` out again and remember why (a load whose engine started but
        whose model cannot be served, e.g. broken tokenizer files)."""
        async with self._manage:
            slot = self._find(src.model_id)
            if slot is not None and slot.source == src:
                await self._evict(slot)
            self._failures[src.model_id] = (src, failed)

    async def unload(self, model_id: str) -> bool:
        self._failures.pop(model_id, None)
        async with self._manage:
            slot = self._find(model_id)
            if slot is None:
                return False
            await self._evict(slot)
            return True

    async def close(self) -> None:
        """Close every engine, after the load in progress (an engine it starts is one of
        them: none is left running)."""
        async with self._manage:
            for slot in list(self._slots):
                await self._evict(slot)

    async def _verify(self, engine: ChatEngine, model_id: str, local: LocalModel) -> None:
        checksum = getattr(engine, "checksum", None)
        if checksum is None:
            return
        expected = expected_checksum(local)
        if expected is None:
            return
        got = (await checksum([VERIFY_TENSOR])).get(VERIFY_TENSOR)
        if got is not None and abs(got - expected) > 1e-3 * max(1.0, abs(expected)):
            raise ServiceUnavailableError(
                f"{model_id}: weights after the swap do not match the checkpoint "
                f"({VERIFY_TENSOR} sum {got} vs {expected}); the engine was dropped"
            )


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
    """Admin view of the engines (safe to call from another thread: reads a copy)."""
    return [
        {
            "model": s.model_id,
            "engine": s.engine.kind,
            "architecture": s.engine.architecture,
            "state": "ready" if s.ready.is_set() else "loading",
            "swaps": s.loads,
        }
        for s in list(pool._slots)
    ]
