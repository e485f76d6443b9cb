"""Job records, events, leases and the model registry, on a KeyValue backend.

Keys (prefix ``realign:``): ``job:<id>`` the record JSON; ``job:<id>:events`` its
event list; ``job:<id>:cancel`` / ``:deliveries`` / ``:lease`` kept apart from the
record so a worker's progress write can never undo an API-side cancel.
"""

from __future__ import annotations

import json
import time
from datetime import datetime
from typing import Any

from pydantic import BaseModel, Field

from app.jobs.kv import KeyValue
from app.jobs.models import EventKind, JobEvent, JobRecord, JobStatus, WorkerInfo, utcnow

P = "realign:"
WORKER_TTL_S = 30.0


class ModelEntry(BaseModel):
    """A merged model that serving can load, with its provenance."""

    id: str
    path: str
    merged_key: str
    residual_key: str
    residual_dir: str | None = None  # in-engine merges: no merged checkpoint on disk
    alpha: float
    base: str
    instruct: str
    target: str
    owner: str
    job_id: str
    created_at: datetime = Field(default_factory=utcnow)
    serve: bool = False
    serve_mode: str = "checkpoint"


class JobRecords:
    """Typed access to everything the job service keeps in Redis (or SQLite)."""

    def __init__(self, kv: KeyValue) -> None:
        self.kv = kv

    # -- jobs -----------------------------------------------------------------------------
    def create(self, rec: JobRecord) -> None:
        self.kv.set(f"{P}job:{rec.id}", rec.model_dump_json())
        score = rec.created_at.timestamp()
        self.kv.zadd(f"{P}jobs", rec.id, score)
        self.kv.zadd(f"{P}jobs:owner:{rec.owner}", rec.id, score)

    def get(self, job_id: str) -> JobRecord | None:
        raw = self.kv.get(f"{P}job:{job_id}")
        if not raw:
            return None
        rec = JobRecord.model_validate_json(raw)
        if not rec.cancel_requested and self.cancel_requested(job_id):
            rec = rec.model_copy(update={"cancel_requested": True})
        return rec

    def save(self, rec: JobRecord) -> JobRecord:
        rec = rec.model_copy(update={"updated_at": utcnow()})
        self.kv.set(f"{P}job:{rec.id}", rec.model_dump_json())
        return rec

    def page(
        self, owner: str | None, status: JobStatus | None, offset: int, limit: int
    ) -> tuple[list[JobRecord], int]:
        index = f"{P}jobs" if owner is None else f"{P}jobs:owner:{owner}"
        ids = self.kv.zrevrange(index, 0, -1)
        raws = self.kv.mget([f"{P}job:{i}" for i in ids])
        recs = [JobRecord.model_validate_json(r) for r in raws if r]
        if status is not None:
            recs = [r for r in recs if r.status == status]
        return recs[offset : offset + limit], len(recs)

    def all_jobs(self) -> list[JobRecord]:
        return self.page(None, None, 0, 1_000_000)[0]

    # -- events ---------------------------------------------------------------------------
    def add_event(self, rec: JobRecord, kind: EventKind, message: str = "") -> JobEvent:
        key = f"{P}job:{rec.id}:events"
        seq = self.kv.llen(key) + 1
        event = JobEvent(
            seq=seq,
            kind=kind,
            status=rec.status,
            stage=rec.stage,
            progress=rec.progress if kind == "progress" else None,
            message=message,
        )
        self.kv.rpush(key, event.model_dump_json())
        return event

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

    def acquire_lease(self, job_id: str, holder: str, ttl: float) -> bool:
        key = f"{P}job:{job_id}:lease"
        if self.kv.get(key) == holder:
            return self.kv.set(key, holder, ex=ttl)
        return self.kv.set(key, holder, nx=True, ex=ttl)

    def release_lease(self, job_id: str, holder: str) -> None:
        key = f"{P}job:{job_id}:lease"
        if self.kv.get(key) == holder:
            self.kv.delete(key)

    def claim(self, name: str, job_id: str, ttl: float | None = None) -> str:
        """Point ``name`` (an idempotency key, an in-flight fingerprint) at a job unless it
        already points somewhere; return the job it points at."""
        key = f"{P}claim:{name}"
        if self.kv.set(key, job_id, nx=True, ex=ttl):
            return job_id
        return self.kv.get(key) or job_id

    def unclaim(self, name: str, job_id: str) -> None:
        key = f"{P}claim:{name}"
        if self.kv.get(key) == job_id:
            self.kv.delete(key)

    def request_load(self, job_id: str) -> None:
        """Hand a finished merge to the serving front end for loading."""
        self.kv.rpush(f"{P}serve:pending", job_id)

    def take_load_requests(self) -> list[str]:
        key = f"{P}serve:pending"
        ids = self.kv.lrange(key, 0, -1)
        if ids:
            self.kv.ltrim(key, len(ids), -1)
        return ids

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

    # -- model registry -------------------------------------------------------------------
    def register_model(self, entry: ModelEntry) -> None:
        self.kv.set(f"{P}model:{entry.id}", entry.model_dump_json())
        self.kv.zadd(f"{P}models", entry.id, time.time())

    def model(self, model_id: str) -> ModelEntry | None:
        raw = self.kv.get(f"{P}model:{model_id}")
        return ModelEntry.model_validate_json(raw) if raw else None

    def models(self) -> list[ModelEntry]:
        ids = self.kv.zrevrange(f"{P}models", 0, -1)
        return [
            ModelEntry.model_validate_json(r)
            for r in self.kv.mget([f"{P}model:{i}" for i in ids])
            if r
        ]
