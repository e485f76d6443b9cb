"""ServingService: the served-model registry, tokenizers, engines, and loading.

Models are loaded from the store by the keys of their catalog entries
(:mod:`app.serving.sources`): fetched into this node's cache when the store is a
bucket, read in place when it is local, and pinned while an engine holds them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

from app.core.errors import (
    ModelLoadFailedError,
    ModelNotFoundError,
    RealignError,
    RecordsUnavailableError,
)
from app.core.settings import Settings
from app.engines.factory import factory_from_settings
from app.engines.pool import EnginePool, ModelLoadingError, ModelSource, describe, load_reason
from app.engines.sizing import context_length
from app.engines.source import LocalModel
from app.handoff.board import LoadBoard
from app.handoff.bus import Bus, make_bus
from app.handoff.entry import ModelEntry
from app.serving.chat import ChatService
from app.serving.protocol import (
    ChatCompletion,
    ChatCompletionRequest,
    Completion,
    CompletionRequest,
    ModelCard,
)
from app.serving.replica import Replica
from app.serving.sources import source_of
from app.serving.tokens import ServedTokenizer
from app.store.base import Store
from app.store.factory import store_from_settings

log = logging.getLogger("app.serving")


class ServingService:
    """Owns this process's engine pool and what it serves; as a serving replica it loads
    the models the job plane announces.

    Args:
        settings: engines, waits, and the store.
        board: the hand-off records (catalog, load notices, replica heartbeats).
        bus: the channels the notices arrive on (from the settings when None).
        role: the role of this process (``all`` or ``serving``), for the heartbeat.
        store: where models are loaded from (``store_from_settings(settings)`` when None).
    """

    def __init__(
        self,
        settings: Settings,
        board: LoadBoard,
        bus: Bus | None = None,
        role: str = "all",
        store: Store | None = None,
    ) -> None:
        self.settings = settings
        self.board = board
        self.store = store if store is not None else store_from_settings(settings)
        factory = factory_from_settings(settings)
        self.pool = EnginePool(factory, settings.max_engines, settings.engine_wait_s)
        self.chat_service = ChatService(self.pool, self.tokenizer, self.context_length)
        self._tokenizers: dict[tuple[str, str], ServedTokenizer] = {}
        self._loading: dict[str, tuple[ModelSource, asyncio.Task[str]]] = {}
        bus = bus if bus is not None else make_bus(settings.redis_url)
        self.replica = Replica(board, bus, self, role)

    # -- lifecycle ------------------------------------------------------------------------
    def start(self) -> None:
        self.replica.start()

    async def stop(self) -> None:
        await self.replica.stop()
        for _, task in list(self._loading.values()):  # a load cut short closes its engine
            task.cancel()
            with contextlib.suppress(Exception):
                await asyncio.wait([task])
        await self.pool.close()

    def readiness(self) -> tuple[bool, str]:
        """Ready when the catalog can be read (loaded models answer without it, but no
        new one could be found)."""
        if not self.board.ping():
            return False, "the model catalog (Redis or the job records database) is not reachable"
        return True, f"ready: replica {self.replica.id}"

    # -- registry -------------------------------------------------------------------------
    def entry(self, model_id: str) -> ModelEntry:
        entry = self.board.model(model_id)
        if entry is None:
            raise ModelNotFoundError(
                f"the model {model_id!r} does not exist; GET /v1/models lists the served models"
            )
        return entry

    def _local(self, model_id: str) -> LocalModel:
        """Where loaded ``model_id``'s files are on this node (pinned by the pool); only
        models of the catalog are loaded (:meth:`_ready` answers 404 for other ids)."""
        local = self.pool.local(model_id)
        if local is None:
            raise ModelLoadingError(f"model {model_id!r} is not loaded; retry shortly")
        return local

    def tokenizer(self, model_id: str) -> ServedTokenizer:
        where = self._local(model_id).assets
        key = (model_id, str(where))
        if key not in self._tokenizers:
            try:
                self._tokenizers[key] = ServedTokenizer.load(where)
            except RealignError:
                raise
            except Exception as exc:  # broken tokenizer files: say so, not a bare 500
                raise ModelLoadFailedError(model_id, f"tokenizer: {load_reason(exc)}") from exc
        return self._tokenizers[key]

    def context_length(self, model_id: str) -> int:
        """Prompt + completion tokens ``model_id`` is served with (the model's own limit
        unless REALIGN_ENGINE_MAX_MODEL_LEN lowers it)."""
        return context_length(self._local(model_id).path, self.settings.engine_max_model_len)

    def source(self, entry: ModelEntry) -> ModelSource:
        return source_of(entry, self.store, self.settings.trusted_code_sha256)

    def models(self) -> list[ModelCard]:
        state = self.pool.loaded()
        return [self.card(e, state.get(e.id, "unloaded")) for e in self.board.models()]

    def card(self, e: ModelEntry, state: str | None = None, *, scores: bool = False) -> ModelCard:
        """The model object of ``e``; with ``scores``, its stored evaluation scores too
        (``realign.evaluations``: one read of the store per score, so one model's card)."""
        state = state or self.pool.loaded().get(e.id, "unloaded")
        card = ModelCard(
            id=e.id,
            created=int(e.created_at.timestamp()),
            owned_by=e.owner,
            realign={
                "base": e.base,
                "instruct": e.instruct,
                "target": e.target,
                "residual_key": e.residual_key,
                "alpha": e.alpha,
                "merged_key": e.merged_key or None,
                "serve_mode": e.serve_mode,
                "state": state,
                "job_id": e.job_id,
            },
        )
        if scores and (evaluations := self._scores(e)) is not None:
            card.realign["evaluations"] = evaluations
        return card

    def _scores(self, e: ModelEntry) -> list[dict[str, Any]] | None:
        """The model's stored evaluation scores, oldest first; None when the store
        cannot be read now (the card goes out without them)."""
        from app.evals.stored import scores_of

        key = e.content_key or e.merged_key
        if not key:
            return []
        try:
            return [s.summary() for s in scores_of(self.store, key)]
        except RealignError as exc:
            log.warning("model %s: evaluation scores not read (%s)", e.id, exc)
            return None

    # -- loading --------------------------------------------------------------------------
    def _loading_task(self, source: ModelSource) -> asyncio.Task[str]:
        """The load of ``source`` in flight, started if there is none (a load of another
        version of its model id is not it)."""
        held = self._loading.get(source.model_id)
        if held is not None and held[0] == source and not held[1].done():
            return held[1]
        task = asyncio.get_running_loop().create_task(self._load(source))
        self._loading[source.model_id] = (source, task)
        return task

    async def _load(self, source: ModelSource) -> str:
        how = await self.pool.load(source)
        try:  # broken tokenizer files fail the load too, and the engine goes
            await asyncio.to_thread(self.tokenizer, source.model_id)
        except ModelLoadFailedError as exc:
            await self.pool.drop(source, exc)
            raise
        return how

    def _in_flight(self) -> set[str]:
        return {m for m, (_, task) in self._loading.items() if not task.done()}

    async def load(self, model_id: str) -> str:
        source = self.source(await asyncio.to_thread(self.entry, model_id))
        return await asyncio.shield(self._loading_task(source))

    async def unload(self, model_id: str) -> bool:
        await asyncio.to_thread(self.entry, model_id)
        return await self.pool.unload(model_id)

    async def _ready(self, model_id: str) -> None:
        """Wait (up to ``engine_wait_s``) for the weights ``model_id`` is registered with,
        loading them on first use (or when the id was registered again with others).

        Raises:
            ModelNotFoundError: no served model has this id.
            ModelLoadFailedError: the last load of these weights failed. No new load is
                started: an explicit load (an admin, a serve job) retries, and a model
                re-registered with other weights is loaded afresh.
            ModelLoadingError: still loading after ``engine_wait_s``.
            RecordsUnavailableError: the catalog cannot be read and the model is not
                loaded here (a loaded model is served meanwhile).
        """
        try:  # off the event loop: a catalog that does not answer stalls no stream
            entry = await asyncio.to_thread(self.entry, model_id)
        except RecordsUnavailableError:
            if self.pool.loaded().get(model_id) == "ready":
                return
            raise
        source = self.source(entry)
        if self.pool.holds(source):
            return
        failed = self.pool.failure(source)
        if failed is not None and model_id not in self._in_flight():
            raise ModelLoadFailedError(model_id, failed.reason)
        try:
            await asyncio.wait_for(
                asyncio.shield(self._loading_task(source)), self.settings.engine_wait_s
            )
        except TimeoutError:
            raise ModelLoadingError(
                f"model {model_id!r} is loading; retry shortly", retry_after=10
            ) from None

    async def chat(self, body: ChatCompletionRequest) -> ChatCompletion | AsyncIterator[str]:
        await self._ready(body.model)
        return await self.chat_service.chat(body)

    async def complete(self, body: CompletionRequest) -> Completion | AsyncIterator[str]:
        await self._ready(body.model)
        return await self.chat_service.complete(body)

    def engines(self) -> list[dict[str, Any]]:
        return describe(self.pool)
