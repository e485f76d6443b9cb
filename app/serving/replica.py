"""This process as a serving replica: it heartbeats (with the engines it holds), takes
"model ready to load" notices (a message, or the records when it starts or missed one),
loads (or, for an admin's unload, unloads) the model and reports back. The job plane
decides from the reports when the job, or the admin's request, ends."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import threading
import time
from typing import Any, Protocol

from app.core.errors import RealignError
from app.engines.pool import load_reason
from app.handoff.board import REPLICA_BEAT_S, LoadBoard, LoadNotice, ReplicaInfo, ReportState
from app.handoff.bus import LOAD_CHANNEL, REPORT_CHANNEL, Bus, Subscription

log = logging.getLogger("app.serving")
SWEEP_S = 30.0  # notices are re-read this often, beside the messages (a safety net)


class Served(Protocol):
    """What a replica does with its engine pool."""

    async def load(self, model_id: str) -> str:
        """Load a model id; returns how, raises why not."""
        ...

    async def unload(self, model_id: str) -> bool:
        """Unload a model id; False when it was not loaded."""
        ...

    def engines(self) -> list[dict[str, Any]]:
        """The engines held now (called from the heartbeat thread)."""
        ...


class Replica:
    """Takes load notices for this process's engine pool.

    Args:
        board: the hand-off records.
        bus: the channels.
        served: the engine pool's owner (loads, unloads, lists engines).
        role: the role this process runs (for the heartbeat).
    """

    def __init__(self, board: LoadBoard, bus: Bus, served: Served, role: str) -> None:
        self.board = board
        self.bus = bus
        self.served = served
        host = socket.gethostname()
        self.info = ReplicaInfo(
            id=f"{role}@{host}:{os.getpid()}", role=role, host=host, pid=os.getpid(),
            started_at=time.time(),
        )  # fmt: skip
        self._taken: set[str] = set()
        self._loads: set[asyncio.Task[None]] = set()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    @property
    def id(self) -> str:
        return self.info.id

    def start(self) -> None:
        """Heartbeat and listen, each in a thread of its own: beats go on while a load
        holds the event loop, and waiting for messages takes no executor thread."""
        self._stop.clear()
        loop = asyncio.get_running_loop()
        self._threads = [
            threading.Thread(target=self._beats, name="realign-replica-beat", daemon=True),
            threading.Thread(
                target=self._listen, args=(loop,), name="realign-replica-notices", daemon=True
            ),
        ]
        for thread in self._threads:
            thread.start()

    async def stop(self) -> None:
        self._stop.set()
        for task in list(self._loads):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        for thread in self._threads:
            await asyncio.to_thread(thread.join, 2 * REPLICA_BEAT_S)
        with contextlib.suppress(Exception):
            await asyncio.to_thread(self.board.forget_replica, self.id)

    def beat(self) -> None:
        """Write this replica's heartbeat, with the engines it holds now."""
        self.board.heartbeat(self.info.model_copy(update={"engines": self.served.engines()}))

    def _beats(self) -> None:
        while not self._stop.is_set():
            try:
                self.beat()
            except Exception as exc:  # Redis restarting: next beat
                log.warning("replica heartbeat failed: %s", exc)
            self._stop.wait(REPLICA_BEAT_S)

    def _listen(self, loop: asyncio.AbstractEventLoop) -> None:
        """Hand every notice (message, or the records after (re)subscribing and every
        :data:`SWEEP_S`) to the event loop, until stopped."""
        sub: Subscription | None = None
        next_sweep = 0.0
        while not self._stop.is_set():
            try:
                if sub is None:
                    sub = self.bus.subscribe(LOAD_CHANNEL)
                    next_sweep = 0.0  # notices sent before (or while away) are in the records
                if time.monotonic() >= next_sweep:
                    for notice in self.board.pending():
                        loop.call_soon_threadsafe(self._take, notice.job_id)
                    next_sweep = time.monotonic() + SWEEP_S
                job_id = sub.get(timeout=1.0)
                if job_id:
                    loop.call_soon_threadsafe(self._take, job_id)
            except Exception as exc:  # Redis restarting (or the loop closed): again shortly
                log.warning("replica %s: load notices: %s", self.id, exc)
                if sub is not None:
                    sub.close()
                sub = None
                self._stop.wait(1.0)
        if sub is not None:
            sub.close()

    def _take(self, job_id: str) -> None:
        if job_id in self._taken:
            return
        self._taken.add(job_id)
        task = asyncio.get_running_loop().create_task(self._serve(job_id))
        self._loads.add(task)
        task.add_done_callback(self._loads.discard)

    async def _serve(self, job_id: str) -> None:
        try:
            notice = await asyncio.to_thread(self.board.notice, job_id)
        except Exception as exc:  # records down: the next sweep takes the notice again
            log.warning("replica %s: job %s: notice not read (%s)", self.id, job_id, exc)
            self._taken.discard(job_id)
            return
        if notice is None:
            return  # withdrawn (the job ended), or another store's job
        await self._report(job_id, "loading")
        try:
            how = await self._act(notice)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            reason = exc.message if isinstance(exc, RealignError) else load_reason(exc)
            log.warning("replica %s: %s: %s failed to %s", self.id, job_id, notice.model_id,
                        notice.action)  # fmt: skip
            await self._report(job_id, "failed", reason)
            return
        log.info("replica %s: %s: %s %s", self.id, job_id, notice.model_id, how)
        with contextlib.suppress(Exception):  # the engines it lists now, before "ready"
            await asyncio.to_thread(self.beat)
        await self._report(job_id, "ready", how=how)

    async def _act(self, notice: LoadNotice) -> str:
        if notice.action == "unload":
            unloaded = await self.served.unload(notice.model_id)
            return "unloaded" if unloaded else "was not loaded"
        return await self.served.load(notice.model_id)

    async def _report(
        self, job_id: str, state: ReportState, reason: str = "", how: str = ""
    ) -> None:
        try:
            await asyncio.to_thread(self.board.report, job_id, self.id, state, reason, how)
            await asyncio.to_thread(self.bus.publish, REPORT_CHANNEL, job_id)
        except Exception as exc:  # records down: the next sweep takes the notice again
            log.warning("replica %s: job %s: report %s lost (%s)", self.id, job_id, state, exc)
            self._taken.discard(job_id)
