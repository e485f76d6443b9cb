"""The records both planes read and write: the model catalog, load notices, replica
reports and replica heartbeats, on the job records' key-value store (Redis or SQLite).

Keys (prefix ``realign:``): ``model:<id>`` and the ``models`` index (the catalog);
``serve:notices`` (index of notices waiting, by time) and ``serve:notice:<id>`` (the
notice) with ``serve:notice:<id>:reports`` (what each replica reported, in order);
``replica:<id>`` (a serving replica's heartbeat with its engines, expiring) and the
``replicas`` index.

A notice comes from a ``serve: true`` job (its id is the job's) or from an admin's load
or unload through the job plane (id ``adm_…``, expiring: nobody waits for it after its
request ends).
"""

from __future__ import annotations

import time
from typing import Any, Literal, Protocol

from pydantic import BaseModel, Field

from app.handoff.entry import ModelEntry

P = "realign:"
REPLICA_TTL_S = 15.0  # a replica not seen for this long is gone
REPLICA_BEAT_S = 5.0
ReportState = Literal["loading", "ready", "failed"]
Action = Literal["load", "unload"]


class KeyValue(Protocol):
    """The operations of the job records' store this board needs."""

    def ping(self) -> bool: ...
    def get(self, key: str) -> str | None: ...
    def mget(self, keys: list[str]) -> list[str | None]: ...
    def set(self, key: str, value: str, *, nx: bool = False, ex: float | None = None) -> bool: ...
    def delete(self, *keys: str) -> None: ...
    def rpush(self, key: str, value: str) -> int: ...
    def lrange(self, key: str, start: int, stop: int) -> list[str]: ...
    def zadd(self, key: str, member: str, score: float) -> None: ...
    def zrevrange(self, key: str, start: int, stop: int) -> list[str]: ...
    def zrem(self, key: str, member: str) -> None: ...


class LoadNotice(BaseModel):
    """A published model that serving replicas should load (a ``serve: true`` job), or
    load or unload (an admin's request through the job plane)."""

    job_id: str  # the job's id, or the admin request's (``adm_…``)
    model_id: str
    announced_at: float = Field(default_factory=time.time)
    action: Action = "load"
    by: Literal["job", "admin"] = "job"


class LoadReport(BaseModel):
    """What one replica did with a notice (``ready``: done; ``how`` says how)."""

    replica: str
    state: ReportState
    reason: str = ""
    how: str = ""
    at: float = Field(default_factory=time.time)


class ReplicaInfo(BaseModel):
    """A live serving replica (from its heartbeat)."""

    id: str
    role: str
    host: str
    pid: int
    started_at: float
    seen_at: float = Field(default_factory=time.time)
    engines: list[dict[str, Any]] = Field(default_factory=list)  # as GET /admin/engines


class LoadBoard:
    """Typed access to the hand-off records."""

    def __init__(self, kv: KeyValue) -> None:
        self.kv = kv

    def ping(self) -> bool:
        return self.kv.ping()

    # -- catalog --------------------------------------------------------------------------
    def register_model(self, entry: ModelEntry) -> None:
        self.kv.set(f"{P}model:{entry.id}", entry.model_dump_json())
        self.kv.zadd(f"{P}models", entry.id, time.time())

    def model(self, model_id: str) -> ModelEntry | None:
        raw = self.kv.get(f"{P}model:{model_id}")
        return ModelEntry.model_validate_json(raw) if raw else None

    def models(self) -> list[ModelEntry]:
        ids = self.kv.zrevrange(f"{P}models", 0, -1)
        raws = self.kv.mget([f"{P}model:{i}" for i in ids])
        return [ModelEntry.model_validate_json(r) for r in raws if r]

    # -- notices --------------------------------------------------------------------------
    def announce(self, job_id: str, model_id: str) -> LoadNotice:
        """Record that ``job_id``'s model is ready to load (kept until withdrawn)."""
        return self.post(LoadNotice(job_id=job_id, model_id=model_id))

    def post(self, notice: LoadNotice, ttl_s: float | None = None) -> LoadNotice:
        """Record ``notice`` until withdrawn (or, with ``ttl_s``, until it expires)."""
        self.kv.set(f"{P}serve:notice:{notice.job_id}", notice.model_dump_json(), ex=ttl_s)
        self.kv.zadd(f"{P}serve:notices", notice.job_id, notice.announced_at)
        return notice

    def notice(self, job_id: str) -> LoadNotice | None:
        raw = self.kv.get(f"{P}serve:notice:{job_id}")
        return LoadNotice.model_validate_json(raw) if raw else None

    def pending(self) -> list[LoadNotice]:
        """Every notice not withdrawn yet, oldest first."""
        ids = list(reversed(self.kv.zrevrange(f"{P}serve:notices", 0, -1)))
        raws = self.kv.mget([f"{P}serve:notice:{i}" for i in ids])
        for notice_id, raw in zip(ids, raws, strict=True):
            if raw is None:  # expired (an admin request whose caller went away)
                self.withdraw(notice_id)
        return [LoadNotice.model_validate_json(r) for r in raws if r]

    def withdraw(self, job_id: str) -> None:
        """The job ended: replicas that have not loaded the model load it on demand."""
        self.kv.zrem(f"{P}serve:notices", job_id)
        self.kv.delete(f"{P}serve:notice:{job_id}", f"{P}serve:notice:{job_id}:reports")

    # -- reports --------------------------------------------------------------------------
    def report(
        self, job_id: str, replica: str, state: ReportState, reason: str = "", how: str = ""
    ) -> bool:
        """Add a replica's report; False when the notice was withdrawn meanwhile."""
        key = f"{P}serve:notice:{job_id}:reports"
        rep = LoadReport(replica=replica, state=state, reason=reason, how=how)
        self.kv.rpush(key, rep.model_dump_json())
        if self.notice(job_id) is None:
            self.kv.delete(key)  # the job ended while this replica loaded
            return False
        return True

    def reports(self, job_id: str) -> dict[str, LoadReport]:
        """The latest report of each replica."""
        raws = self.kv.lrange(f"{P}serve:notice:{job_id}:reports", 0, -1)
        latest: dict[str, LoadReport] = {}
        for raw in raws:
            rep = LoadReport.model_validate_json(raw)
            latest[rep.replica] = rep
        return latest

    # -- replicas -------------------------------------------------------------------------
    # Each replica's heartbeat key expires; the ``replicas`` index lists the ids to read
    # (no keyspace scan), pruned of the ones whose key has expired.
    def heartbeat(self, info: ReplicaInfo) -> None:
        info = info.model_copy(update={"seen_at": time.time()})
        self.kv.set(f"{P}replica:{info.id}", info.model_dump_json(), ex=REPLICA_TTL_S)
        self.kv.zadd(f"{P}replicas", info.id, info.seen_at)

    def forget_replica(self, replica_id: str) -> None:
        self.kv.delete(f"{P}replica:{replica_id}")
        self.kv.zrem(f"{P}replicas", replica_id)

    def replicas(self) -> list[ReplicaInfo]:
        """The replicas alive now."""
        ids = self.kv.zrevrange(f"{P}replicas", 0, -1)
        raws = self.kv.mget([f"{P}replica:{i}" for i in ids])
        for replica_id, raw in zip(ids, raws, strict=True):
            if raw is None:
                self.kv.zrem(f"{P}replicas", replica_id)
        return [ReplicaInfo.model_validate_json(r) for r in raws if r]
