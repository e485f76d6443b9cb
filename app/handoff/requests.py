"""An admin's engine control from the job plane, where the gateway sends ``/admin/*``.

A load or unload is posted as a notice to every serving replica (the records, and a
message on the load channel), exactly as a ``serve: true`` job's model is, and answered
from the replicas' reports with the same judge; the notice expires if its caller goes
away. The engines are those the replicas list in their heartbeats.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

from app.core.errors import ModelNotFoundError, ReplicaRequestError
from app.handoff.board import Action, LoadBoard, LoadNotice, LoadReport
from app.handoff.bus import LOAD_CHANNEL, REPORT_CHANNEL, Bus, Subscription
from app.handoff.verdict import Verdict, judge

POLL_S = 0.5  # the reports are read again this often without a message


class ReplicaRequests:
    """Load, unload and list engines on every live serving replica.

    Args:
        board: the hand-off records.
        bus: the channels.
        timeout_s: how long a request waits for the replicas (REALIGN_SERVE_LOAD_TIMEOUT_S).
    """

    def __init__(self, board: LoadBoard, bus: Bus, timeout_s: float) -> None:
        self.board = board
        self.bus = bus
        self.timeout_s = timeout_s

    async def load(self, model_id: str) -> dict[str, Any]:
        """Load ``model_id`` on every live replica (the ones that start meanwhile too).

        Raises:
            ModelNotFoundError: not in the catalog.
            ReplicaRequestError: a replica could not load it, none answered in time, or
                none is running.
        """
        done = await self._ask(model_id, "load")
        hows = sorted({rep.how for rep in done.values()})
        how = hows[0] if len(hows) == 1 else "; ".join(f"{r}: {p.how}" for r, p in done.items())
        return {"model": model_id, "status": "ready", "how": how, "replicas": _hows(done)}

    async def unload(self, model_id: str) -> dict[str, Any]:
        """Unload ``model_id`` from every live replica (ReplicaRequestError as for load)."""
        done = await self._ask(model_id, "unload")
        unloaded = any(rep.how == "unloaded" for rep in done.values())
        return {"model": model_id, "unloaded": unloaded, "replicas": _hows(done)}

    def engines(self) -> list[dict[str, Any]]:
        """Every live replica's engines, each marked with its replica."""
        return [{**e, "replica": r.id} for r in self.board.replicas() for e in r.engines]

    async def _ask(self, model_id: str, action: Action) -> dict[str, LoadReport]:
        """Post the request, wait for the verdict, withdraw it; the replicas' reports."""
        if await asyncio.to_thread(self.board.model, model_id) is None:
            raise ModelNotFoundError(
                f"the model {model_id!r} does not exist; GET /v1/models lists the served models"
            )
        if not await asyncio.to_thread(self.board.replicas):
            raise ReplicaRequestError(
                f"no serving replica is running to {action} {model_id!r}: start one with "
                "`realign serve --role serving` (REALIGN_SERVE_ROLE=serving)",
                "no_serving_replica",
            )
        notice = LoadNotice(
            job_id=f"adm_{uuid.uuid4().hex[:20]}", model_id=model_id, action=action, by="admin"
        )
        sub = await asyncio.to_thread(self.bus.subscribe, REPORT_CHANNEL)
        try:
            await asyncio.to_thread(self.board.post, notice, self.timeout_s + 60)
            await asyncio.to_thread(self.bus.publish, LOAD_CHANNEL, notice.job_id)
            verdict, reports = await self._wait(notice, sub)
        finally:
            await asyncio.to_thread(self._end, notice.job_id, sub)
        if verdict.status != "succeeded":
            failed = "model_load_failed" if action == "load" else "model_unload_failed"
            code = failed if verdict.code == "load_failed" else "load_timeout"
            raise ReplicaRequestError(verdict.message, code)
        return {r: rep for r, rep in reports.items() if rep.state == "ready"}

    async def _wait(
        self, notice: LoadNotice, sub: Subscription
    ) -> tuple[Verdict, dict[str, LoadReport]]:
        hint = "Replicas still at it go on; GET /admin/engines shows where it is loaded"
        while True:
            reports, live = await asyncio.to_thread(self._state, notice.job_id)
            verdict = judge(notice, reports, live, None, self.timeout_s, time.time(), hint)
            if verdict is not None:
                return verdict, reports
            await asyncio.to_thread(sub.get, POLL_S)  # a report (of any notice) wakes it

    def _state(self, notice_id: str) -> tuple[dict[str, LoadReport], set[str]]:
        return self.board.reports(notice_id), {r.id for r in self.board.replicas()}

    def _end(self, notice_id: str, sub: Subscription) -> None:
        try:
            self.board.withdraw(notice_id)
        finally:
            sub.close()


def _hows(done: dict[str, LoadReport]) -> dict[str, str]:
    return {r: rep.how for r, rep in sorted(done.items())}
