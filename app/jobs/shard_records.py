"""What the workers of a merge split by output shard share, in the job records.

Keys (prefix ``realign:job:<id>:split``): ``:plan`` the split (JSON), ``:shard:<i>``
the result of shard i (written once), ``:shard:<i>:deliveries`` / ``:lease`` /
``:bytes`` its delivery count, lease and progress, ``:end`` how the job ended (the
first ender wins). They play the part of a Celery chord's counter and results,
without a result backend: the task that records the last shard queues the final one.
"""

from __future__ import annotations

import json

from pydantic import BaseModel, ConfigDict

from app.jobs.kv import KeyValue
from app.jobs.models import JobError, JobStatus
from app.residuals.manifest import LineageInfo, SourceInfo

_P = "realign:job:"
_TTL_S = 30 * 24 * 3600.0  # a split whose job vanished does not stay forever


class SplitPlan(BaseModel):
    """A merge split by output shard: only references, sizes and names.

    Attributes:
        residual_key: the stored residual pack applied (every task reads it through
            its own node's store).
        target: the target as every node resolves it: a pinned ``s3://…@sha256:…`` or
            ``hf:org/name@<commit>`` ref, or a local directory when the store is local
            (a file system the workers share).
        target_src: identity of the target, for the manifest (and, for an ``s3://``
            target, the size and sha256 of each file a task fetches).
        merged_key: where the merged model is published.
        max_shard_bytes: the shard size every worker plans with.
        layout: :func:`~app.residuals.plan.layout_digest` of the output, which each
            task checks against the inputs it reads.
        files: output shard names, in order; ``nbytes`` their tensor bytes.
        lineage: the target against the base, measured by the planning node (which holds
            both); None when the residual was given (its base may be elsewhere).
    """

    model_config = ConfigDict(frozen=True)

    residual_key: str
    target: str
    target_src: SourceInfo
    alpha: float
    merged_key: str
    max_shard_bytes: int
    layout: str
    files: list[str]
    nbytes: list[int]
    tensors: list[int]
    lineage: LineageInfo | None = None


class ShardResult(BaseModel):
    """A written shard: its file, size and sha256, the worker that wrote it and the
    input bytes it fetched from the object store (0: it read a shared file system)."""

    model_config = ConfigDict(frozen=True)

    file: str
    size: int
    sha256: str
    worker: str
    fetched: int = 0
    xxh3_128: str | None = None  # the read-path checksum (None: recorded before it)


class SplitEnd(BaseModel):
    status: JobStatus
    error: JobError | None = None


class SplitRecords:
    """The shared state of one job's split.

    Args:
        kv: the job records' key-value backend.
        job_id: the job.
    """

    def __init__(self, kv: KeyValue, job_id: str) -> None:
        self.kv = kv
        self.job_id = job_id
        self._k = f"{_P}{job_id}:split"

    def save_plan(self, plan: SplitPlan) -> SplitPlan:
        """Store ``plan`` unless one is stored already; return the stored one."""
        if self.kv.set(f"{self._k}:plan", plan.model_dump_json(), nx=True, ex=_TTL_S):
            return plan
        return self.plan() or plan

    def plan(self) -> SplitPlan | None:
        raw = self.kv.get(f"{self._k}:plan")
        return SplitPlan.model_validate_json(raw) if raw else None

    def record(self, index: int, result: ShardResult) -> None:
        self.kv.set(f"{self._k}:shard:{index}", result.model_dump_json(), nx=True, ex=_TTL_S)

    def results(self, count: int) -> list[ShardResult | None]:
        raws = self.kv.mget([f"{self._k}:shard:{i}" for i in range(count)])
        return [ShardResult.model_validate_json(r) if r else None for r in raws]

    def deliveries(self, index: int) -> int:
        return int(self.kv.get(f"{self._k}:shard:{index}:deliveries") or 0)

    def count_delivery(self, index: int) -> int:
        return self.kv.incr(f"{self._k}:shard:{index}:deliveries")

    def acquire(self, index: int, holder: str, ttl: float) -> bool:
        return self.kv.acquire(f"{self._k}:shard:{index}:lease", holder, ttl)

    def release(self, index: int, holder: str) -> None:
        self.kv.release(f"{self._k}:shard:{index}:lease", holder)

    def leased(self, count: int) -> bool:
        """Whether any shard's lease is held (a worker is writing)."""
        keys = [f"{self._k}:shard:{i}:lease" for i in range(count)]
        return any(v is not None for v in self.kv.mget(keys))

    def set_progress(self, index: int, nbytes: int, tensors: int) -> None:
        self.kv.set(f"{self._k}:shard:{index}:bytes", json.dumps([nbytes, tensors]), ex=_TTL_S)

    def progress(self, count: int) -> tuple[int, int]:
        """(bytes, tensors) written so far over all shards."""
        raws = self.kv.mget([f"{self._k}:shard:{i}:bytes" for i in range(count)])
        done = [json.loads(r) for r in raws if r]
        return sum(d[0] for d in done), sum(d[1] for d in done)

    def end(self, status: JobStatus, error: JobError | None) -> SplitEnd:
        """Record how the job ends unless it was recorded already; return what is."""
        mine = SplitEnd(status=status, error=error)
        if self.kv.set(f"{self._k}:end", mine.model_dump_json(), nx=True, ex=_TTL_S):
            return mine
        return self.ended() or mine

    def ended(self) -> SplitEnd | None:
        raw = self.kv.get(f"{self._k}:end")
        return SplitEnd.model_validate_json(raw) if raw else None

    def forget_deliveries(self, count: int) -> None:
        """Drop the shards' delivery counts (kept without expiry while the split runs);
        the job has ended, so a late delivery only sees the end."""
        self.kv.delete(*(f"{self._k}:shard:{i}:deliveries" for i in range(count)))

    def clear(self, count: int) -> None:
        """Forget the split (its job has a final state)."""
        keys = [f"{self._k}:plan", f"{self._k}:end"]
        for i in range(count):
            keys += [f"{self._k}:shard:{i}{s}" for s in ("", ":deliveries", ":lease", ":bytes")]
        self.kv.delete(*keys)
