"""Job records, events, leases and the model registry, on a KeyValue backend.

Keys (prefix ``realign:``): ``job:<id>`` the record JSON; ``job:<id>:events`` its
event list; ``job:<id>:cancel`` / ``:deliveries`` / ``:lease`` kept apart from the
record so a worker's progress write can never undo an API-side cancel.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import datetime
from typing import Any

from app.core.errors import JobStateError
from app.handoff.board import LoadBoard
from app.handoff.entry import ModelEntry
from app.jobs.kv import KeyValue
from app.jobs.models import EventKind, JobEvent, JobRecord, JobStatus, WorkerInfo, utcnow

P = "realign:"
WORKER_TTL_S = 30.0
INDEX_VERSION = "2"
# per-job keys beside the record itself (suffixes of ``job:<id>``)
_JOB_KEYS = ("", ":events", ":cancel", ":deliveries", ":lease", ":resends", ":resent")
_FINAL = tuple(s.value for s in JobStatus if s.terminal)


class JobFinishedError(JobStateError):
    """The job's record is already in a final state; a write would have undone it."""


class JobRecords:
    """Typed access to everything the job service keeps in Redis (or SQLite)."""

    def __init__(self, kv: KeyValue) -> None:
        self.kv = kv
        self.board = LoadBoard(kv)  # the catalog and load notices shared with serving

    # -- jobs -----------------------------------------------------------------------------
    # Indexes (sorted sets scored by creation time): ``jobs``, ``jobs:owner:<o>``,
    # ``jobs:status:<s>``, ``jobs:owner:<o>:status:<s>``; terminal jobs also sit in
    # ``jobs:finished`` scored by finish time, which retention sweeps.
    def _indexes(self, rec: JobRecord) -> tuple[dict[str, float], list[str]]:
        created = rec.created_at.timestamp()
        add = {
            f"{P}jobs": created,
            f"{P}jobs:owner:{rec.owner}": created,
            f"{P}jobs:status:{rec.status.value}": created,
            f"{P}jobs:owner:{rec.owner}:status:{rec.status.value}": created,
        }
        remove = [
            key
            for s in JobStatus
            if s != rec.status
            for key in (f"{P}jobs:status:{s.value}", f"{P}jobs:owner:{rec.owner}:status:{s.value}")
        ]
        if rec.status.terminal:
            add[f"{P}jobs:finished"] = (rec.finished_at or rec.updated_at).timestamp()
        else:
            remove.append(f"{P}jobs:finished")
        return add, remove

    def create(self, rec: JobRecord) -> None:
        add, remove = self._indexes(rec)
        self.kv.write({f"{P}job:{rec.id}": rec.model_dump_json()}, rec.id, add, remove)

    def get(self, job_id: str) -> JobRecord | None:
        return self._load([job_id])[0]

    def _load(self, ids: list[str]) -> list[JobRecord | None]:
        """Records with their live flags (cancel, deliveries), which are kept apart."""
        keys = [f"{P}job:{i}{suffix}" for i in ids for suffix in ("", ":cancel", ":deliveries")]
        values = self.kv.mget(keys)
        out: list[JobRecord | None] = []
        for n in range(len(ids)):
            raw, cancel, deliveries = values[3 * n : 3 * n + 3]
            if not raw:
                out.append(None)
                continue
            update: dict[str, Any] = {"deliveries": int(deliveries or 0)}
            if cancel is not None:
                update["cancel_requested"] = True
            out.append(JobRecord.model_validate_json(raw).model_copy(update=update))
        return out

    def save(self, rec: JobRecord) -> JobRecord:
        """Write ``rec`` and move it between the status indexes, in one transaction that
        never overwrites a final record (the first final state written is the job's).

        Raises:
            JobFinishedError: the stored record is already final; nothing was written.
        """
        rec = rec.model_copy(update={"updated_at": utcnow()})
        add, remove = self._indexes(rec)
        key, value = f"{P}job:{rec.id}", rec.model_dump_json()
        if not self.kv.put_unless(key, value, _FINAL, rec.id, add, remove):
            raise JobFinishedError(
                f"job {rec.id} already ended; its final state stays (not {rec.status.value})"
            )
        return rec

    def page(
        self, owner: str | None, status: JobStatus | None, offset: int, limit: int
    ) -> tuple[list[JobRecord], int]:
        """One page, newest first, read from the index of (owner, status): no scan."""
        index = f"{P}jobs" if owner is None else f"{P}jobs:owner:{owner}"
        if status is not None:  # realign:jobs:status:<s> or realign:jobs:owner:<o>:status:<s>
            index = f"{index}:status:{status.value}"
        ids = self.kv.zrevrange(index, offset, offset + limit - 1)
        return [r for r in self._load(ids) if r is not None], self.kv.zcard(index)

    def count_by_status(self) -> dict[str, int]:
        return {s.value: self.kv.zcard(f"{P}jobs:status:{s.value}") for s in JobStatus}

    def unfinished(self) -> list[str]:
        """Ids of every job not yet terminal (from the status indexes)."""
        return [
            job_id
            for s in JobStatus
            if not s.terminal
            for job_id in reversed(self.kv.zrevrange(f"{P}jobs:status:{s.value}", 0, -1))
        ]

    def running(self) -> list[str]:
        return self.with_status(JobStatus.running)

    def with_status(self, status: JobStatus) -> list[str]:
        return self.kv.zrevrange(f"{P}jobs:status:{status.value}", 0, -1)

    def queued_pages(self, created: datetime, page: int) -> Iterator[list[JobRecord]]:
        """Every queued job created before ``created``, oldest first, ``page`` records at
        a time: a cursor walks the status index (no scan), so each page reads at most
        ``page`` entries however long the queue, none is seen twice, and a job that
        leaves the queue meanwhile is simply not met again."""
        index, cursor = f"{P}jobs:status:queued", None
        while rows := self.kv.zrange_after(index, created.timestamp(), cursor, page):
            member, score = rows[-1]
            cursor = (score, member)
            yield [r for r in self._load([m for m, _ in rows]) if r is not None]

    def purge_finished(self, older_than: datetime, batch: int = 500) -> int:
        """Delete terminal jobs finished before ``older_than``: record, events, flags and
        index entries. Returns how many went."""
        ids = self.kv.zrange_upto(f"{P}jobs:finished", older_than.timestamp(), batch)
        raws = self.kv.mget([f"{P}job:{i}" for i in ids])
        for job_id, raw in zip(ids, raws, strict=True):
            owner = JobRecord.model_validate_json(raw).owner if raw else None
            self.kv.delete(*(f"{P}job:{job_id}{s}" for s in _JOB_KEYS))
            indexes = [f"{P}jobs", f"{P}jobs:finished"]
            indexes += [f"{P}jobs:status:{s.value}" for s in JobStatus]
            if owner is not None:
                indexes.append(f"{P}jobs:owner:{owner}")
                indexes += [f"{P}jobs:owner:{owner}:status:{s.value}" for s in JobStatus]
            self.kv.write({}, job_id, {}, indexes)
        return len(ids)

    def ensure_indexes(self) -> None:
        """Build the status indexes of records written before they existed (once)."""
        marker = f"{P}index:version"
        if self.kv.get(marker) == INDEX_VERSION:
            return
        ids = self.kv.zrevrange(f"{P}jobs", 0, -1)
        for raw in self.kv.mget([f"{P}job:{i}" for i in ids]):
            if raw:
                rec = JobRecord.model_validate_json(raw)
                add, remove = self._indexes(rec)
                self.kv.write({}, rec.id, add, remove)
        self.kv.set(marker, INDEX_VERSION)

    # -- events ---------------------------------------------------------------------------
    def add_event(self, rec: JobRecord, kind: EventKind, message: str = "") -> JobEvent:
        """Append an event; its ``seq`` is its position, taken atomically with the append
        (concurrent writers never share one, so SSE resume by ``seq`` is exact)."""
        event = JobEvent(
            seq=0,
            kind=kind,
            status=rec.status,
            stage=rec.stage,
            progress=rec.progress if kind == "progress" else None,
            message=message,
        )
        body = event.model_dump_json(exclude={"seq"})
        seq = self.kv.append_numbered(f"{P}job:{rec.id}:events", body)
        return event.model_copy(update={"seq": seq})

    def events(self, job_id: str, after: int = 0) -> list[JobEvent]:
        raws = self.kv.lrange(f"{P}job:{job_id}:events", after, -1)
        return [JobEvent.model_validate_json(r) for r in raws]

    # -- coordination ---------------------------------------------------------------------
    def request_cancel(self, job_id: str) -> None:
        self.kv.set(f"{P}job:{job_id}:cancel", "1")

    def cancel_requested(self, job_id: str) -> bool:
        return self.kv.get(f"{P}job:{job_id}:cancel") is not None

    def count_delivery(self, job_id: str) -> int:
        return self.kv.incr(f"{P}job:{job_id}:deliveries")

    def deliveries(self, job_id: str) -> int:
        return int(self.kv.get(f"{P}job:{job_id}:deliveries") or 0)

    def claim_resend(self, job_id: str, holder: str, period: float) -> bool:
        """True for the one caller per ``period`` that may send the job's message again."""
        return self.kv.set(f"{P}job:{job_id}:resent", holder, nx=True, ex=period)

    def count_resend(self, job_id: str) -> int:
        return self.kv.incr(f"{P}job:{job_id}:resends")

    def resends(self, job_id: str) -> int:
        return int(self.kv.get(f"{P}job:{job_id}:resends") or 0)

    def acquire_lease(self, job_id: str, holder: str, ttl: float) -> bool:
        """Take or renew the job's lease (compare-and-set: never over another holder)."""
        return self.kv.acquire(f"{P}job:{job_id}:lease", holder, ttl)

    def release_lease(self, job_id: str, holder: str) -> None:
        self.kv.release(f"{P}job:{job_id}:lease", holder)

    def lease_holder(self, job_id: str) -> str | None:
        return self.kv.get(f"{P}job:{job_id}:lease")

    def claim(self, name: str, job_id: str, ttl: float | None = None) -> str:
        """Point ``name`` (an idempotency key, an in-flight fingerprint) at a job unless it
        already points somewhere; return the job it points at."""
        key = f"{P}claim:{name}"
        if self.kv.set(key, job_id, nx=True, ex=ttl):
            return job_id
        return self.kv.get(key) or job_id

    def unclaim(self, name: str, job_id: str) -> None:
        self.kv.release(f"{P}claim:{name}", job_id)

    # -- workers and stats ----------------------------------------------------------------
    def heartbeat(self, info: WorkerInfo) -> None:
        info = info.model_copy(update={"seen_at": utcnow()})
        self.kv.set(f"{P}worker:{info.name}", info.model_dump_json(), ex=WORKER_TTL_S)

    def forget_worker(self, name: str) -> None:
        self.kv.delete(f"{P}worker:{name}")

    def workers(self) -> list[WorkerInfo]:
        keys = self.kv.scan(f"{P}worker:")
        return [WorkerInfo.model_validate_json(r) for r in self.kv.mget(keys) if r]

    def record_finish(self, rec: JobRecord, bytes_merged: int) -> None:
        if rec.started_at and rec.finished_at:
            took = (rec.finished_at - rec.started_at).total_seconds()
            self.kv.rpush(f"{P}stats:durations", json.dumps(round(took, 3)))
            self.kv.ltrim(f"{P}stats:durations", -1000, -1)
        if bytes_merged:
            self.kv.incr(f"{P}stats:bytes_merged", bytes_merged)

    def stats(self) -> dict[str, Any]:
        durations = [float(x) for x in self.kv.lrange(f"{P}stats:durations", 0, -1)]
        return {
            "durations_s": durations,
            "bytes_merged": int(self.kv.get(f"{P}stats:bytes_merged") or 0),
        }

    # -- model registry (the hand-off catalog) ---------------------------------------
    def register_model(self, entry: ModelEntry) -> None:
        self.board.register_model(entry)

    def model(self, model_id: str) -> ModelEntry | None:
        return self.board.model(model_id)

    def models(self) -> list[ModelEntry]:
        return self.board.models()


__all__ = ["JobRecords", "ModelEntry", "P"]
