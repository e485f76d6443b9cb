"""JobService: what the API calls. Validates cheaply, records, queues, reports."""

from __future__ import annotations

import hashlib
import logging
import os
import uuid
from pathlib import Path
from typing import Any

from app.core.errors import (
    ArtifactCorruptError,
    InvalidRefError,
    JobNotFoundError,
    JobStateError,
    ModelNotFoundError,
    PathNotAllowedError,
    RecordsUnavailableError,
)
from app.core.settings import Settings
from app.evals.models import EvalJob
from app.jobs.broker import TASK_VALIDATE, make_celery
from app.jobs.dispatch import CeleryDispatcher, Dispatcher, ThreadDispatcher
from app.jobs.evalcheck import check_eval_job, check_eval_request, sweep_request
from app.jobs.failures import free_space
from app.jobs.kv import RedisKV
from app.jobs.locks import cluster_store
from app.jobs.models import Caller, JobEvent, JobRecord, JobStatus, MergeSpec, WorkerInfo
from app.jobs.records import JobRecords, ModelEntry
from app.jobs.requests import check_method
from app.jobs.sqlite_kv import SqliteKV
from app.residuals.manifest import ResidualManifest, read_residual_manifest
from app.residuals.refs import ModelRef

IDEMPOTENCY_TTL_S = 24 * 3600
log = logging.getLogger("app.jobs")


class JobService:
    """Submit, inspect and cancel merge jobs; report on workers, queues and the store."""

    def __init__(self, settings: Settings, records: JobRecords, dispatcher: Dispatcher) -> None:
        self.settings = settings
        self.records = records
        self.dispatcher = dispatcher
        self.store = cluster_store(settings)
        self.embedded = isinstance(dispatcher, ThreadDispatcher)

    @classmethod
    def from_settings(cls, settings: Settings) -> JobService:
        """Embedded (SQLite records, in-process worker) without a Redis URL; Redis and
        Celery otherwise."""
        if not settings.redis_url:
            return cls.in_process(settings)
        kv = RedisKV(settings.redis_url)
        records = _indexed(JobRecords(kv))
        return cls(settings, records, CeleryDispatcher(make_celery(settings), kv.client))

    @classmethod
    def in_process(cls, settings: Settings, *, adopt: bool = True) -> JobService:
        """SQLite records in the store and an in-process worker (whatever
        ``settings.redis_url`` says). ``adopt=False``: the worker runs only the jobs this
        process submits (a command line sharing the records with a server)."""
        records = _indexed(JobRecords(SqliteKV(settings.models_cache_dir / ".jobs.sqlite")))
        return cls(settings, records, ThreadDispatcher(records, settings, adopt=adopt))

    def start(self) -> None:
        self.dispatcher.start()

    def stop(self) -> None:
        self.dispatcher.stop()

    # -- jobs -----------------------------------------------------------------------------
    def submit(
        self, spec: MergeSpec, caller: Caller, idempotency_key: str | None = None
    ) -> tuple[JobRecord, bool]:
        """Validate what is cheap, record the job and queue its first step.

        Returns:
            The job and whether it was created (False: an identical in-flight job or the
            same idempotency key already had one).
        """
        if spec.dtype is None:
            spec = spec.model_copy(update={"dtype": self.settings.residual_dtype})
        self._validate(spec)
        if spec.sweep is not None:
            spec = sweep_request(spec)
        if spec.eval is not None:
            spec = spec.model_copy(update={"eval": check_eval_request(spec.eval, self._check_file)})
        fingerprint = hashlib.sha256(spec.fingerprint_json().encode()).hexdigest()
        rec = JobRecord(
            id=f"mrg_{uuid.uuid4().hex[:20]}",
            owner=caller.name,
            spec=spec,
            idempotency_key=idempotency_key,
            fingerprint=fingerprint,
        )
        return self._enqueue(rec, caller)

    def submit_eval(
        self, job: EvalJob, caller: Caller, idempotency_key: str | None = None
    ) -> tuple[JobRecord, bool]:
        """Check an eval request (the model known, its files allowed), record it, queue it.

        Returns:
            The job and whether it was created, as :meth:`submit`.
        """
        job = check_eval_job(job, self.records.models(), self._check_ref, self._check_file)
        fingerprint = hashlib.sha256(f"eval:{job.model_dump_json()}".encode()).hexdigest()
        rec = JobRecord(
            id=f"evl_{uuid.uuid4().hex[:20]}",
            owner=caller.name,
            kind="eval",
            evaluation=job,
            idempotency_key=idempotency_key,
            fingerprint=fingerprint,
        )
        return self._enqueue(rec, caller)

    def _enqueue(self, rec: JobRecord, caller: Caller) -> tuple[JobRecord, bool]:
        """Record ``rec`` and queue its first step, unless an identical job is in flight or
        its idempotency key already has one (then that one, and False)."""
        fingerprint, idempotency_key = rec.fingerprint, rec.idempotency_key
        if idempotency_key:
            existing = self.records.kv.get(f"realign:claim:idem:{caller.name}:{idempotency_key}")
            if existing:
                return self._same_request(existing, fingerprint), False
        ttl = float(self.settings.visibility_timeout_s)
        winner = self.records.claim(f"inflight:{caller.name}:{fingerprint}", rec.id, ttl)
        if winner != rec.id and (other := self.records.get(winner)) is not None:
            if not other.status.terminal:
                self._remember_idempotency(caller, idempotency_key, other.id)
                return other, False
            self.records.unclaim(f"inflight:{caller.name}:{fingerprint}", winner)
            self.records.claim(f"inflight:{caller.name}:{fingerprint}", rec.id, ttl)
        if idempotency_key:
            winner = self.records.claim(
                f"idem:{caller.name}:{idempotency_key}", rec.id, IDEMPOTENCY_TTL_S
            )
            if winner != rec.id:
                self.records.unclaim(f"inflight:{caller.name}:{fingerprint}", rec.id)
                return self._same_request(winner, fingerprint), False
        self.records.create(rec)
        self.records.add_event(rec, "status", "queued")
        self.dispatcher.send(TASK_VALIDATE, rec.id)
        return rec, True

    def _remember_idempotency(self, caller: Caller, key: str | None, job_id: str) -> None:
        if key:
            self.records.claim(f"idem:{caller.name}:{key}", job_id, IDEMPOTENCY_TTL_S)

    def _same_request(self, job_id: str, fingerprint: str) -> JobRecord:
        rec = self.records.get(job_id)
        if rec is None:
            raise JobNotFoundError(f"job {job_id} for this Idempotency-Key has expired")
        if rec.fingerprint != fingerprint:
            raise JobStateError(
                "this Idempotency-Key was used with a different request body; "
                "use a new key for a new request"
            )
        return rec

    def get(self, job_id: str, caller: Caller) -> JobRecord:
        rec = self.records.get(job_id)
        if rec is None or (rec.owner != caller.name and not caller.is_admin):
            raise JobNotFoundError(f"no job {job_id!r}")
        return rec

    def report_html(self, job_id: str, caller: Caller) -> str:
        """The HTML report of the job's evaluation.

        Raises:
            JobStateError: the job ran no evaluation (yet).
        """
        rec = self.get(job_id, caller)
        report = rec.result.evaluation if rec.result is not None else None
        if report is None:
            asked = rec.kind == "eval" or rec.spec.eval is not None
            state = f"is {rec.status.value}" if asked else "asked for no evaluation"
            raise JobStateError(f"job {job_id} has no evaluation report: it {state}")
        from app.evals.report import render_report

        return render_report(report)

    def events(self, job_id: str, caller: Caller, after: int = 0) -> list[JobEvent]:
        self.get(job_id, caller)
        return self.records.events(job_id, after)

    def cancel(self, job_id: str, caller: Caller) -> JobRecord:
        rec = self.get(job_id, caller)
        if rec.status.terminal:
            raise JobStateError(f"job {job_id} already {rec.status.value}; nothing to cancel")
        self.records.request_cancel(job_id)
        self.records.add_event(rec, "log", f"cancel requested by {caller.name}")
        return self.get(job_id, caller)

    # -- validation -----------------------------------------------------------------------
    def _validate(self, spec: MergeSpec) -> None:
        if spec.residuals:
            self._validate_residuals(spec)
        elif spec.residual is not None:
            if spec.base or spec.instruct:
                raise InvalidRefError("give either residual or base + instruct, not both")
            if spec.target is None:
                raise InvalidRefError("a residual needs a target to apply it to")
            self.store.resolve(spec.residual)
        elif not (spec.base and spec.instruct):
            raise InvalidRefError("base and instruct are required (or a stored residual key)")
        for ref in (spec.base, spec.instruct, spec.target):
            if ref is not None:
                self._check_ref(ref)
        check_method(spec)

    def _validate_residuals(self, spec: MergeSpec) -> None:
        if spec.residual or spec.base or spec.instruct:
            raise InvalidRefError("give either residuals or one residual, not both")
        if spec.target is None:
            raise InvalidRefError("residuals need a target to apply them to")
        for item in spec.residuals:
            if item.key is not None:
                self.store.resolve(item.key)
            for ref in (item.base, item.instruct):
                if ref is not None:
                    self._check_ref(ref)

    def allowed_roots(self) -> list[Path]:
        roots = self.settings.allowed_roots or [self.settings.models_cache_dir]
        return [Path(os.path.realpath(r)) for r in roots]

    def _check_file(self, text: str, what: str, *, directory: bool = False) -> str:
        """A path the evaluation reads (a text file, a task directory): under an allowed
        root and there; returns it resolved."""
        real = Path(os.path.realpath(text))
        roots = self.allowed_roots()
        if not any(real.is_relative_to(root) for root in roots):
            raise PathNotAllowedError(
                f"{what} {text}: resolves to {real}, outside the allowed roots "
                f"({', '.join(map(str, roots))}); put it there or extend REALIGN_ALLOWED_ROOTS"
            )
        if not (real.is_dir() if directory else real.is_file()):
            kind = "directory" if directory else "file"
            raise ModelNotFoundError(f"{what} {text}: no such {kind}")
        return str(real)

    def _check_ref(self, text: str) -> None:
        ref = ModelRef.parse(text)
        if ref.kind != "local":
            return
        assert ref.path is not None
        real = Path(os.path.realpath(ref.path))  # follows symlinks: no escape through them
        roots = self.allowed_roots()
        if not any(real.is_relative_to(root) for root in roots):
            raise PathNotAllowedError(
                f"{text}: resolves to {real}, outside the allowed model roots "
                f"({', '.join(map(str, roots))}); put the model there or extend "
                "REALIGN_ALLOWED_ROOTS"
            )
        if not real.is_dir():
            raise ModelNotFoundError(f"{text}: no such model directory")

    # -- admin ----------------------------------------------------------------------------
    def queue_depths(self) -> dict[str, int]:
        return self.dispatcher.depths()

    def workers(self) -> list[WorkerInfo]:
        return self.records.workers()

    def readiness(self) -> tuple[bool, str]:
        """Whether this process can take jobs now, and if not, every check that failed.

        No live worker does not make it unready: jobs queue until one starts, and a probe
        failing on it would drop every API replica from its Service (and the chat routes
        with it) while workers restart. The detail names it; ``realign_workers_alive``
        counts them.
        """
        if not self.records.kv.ping():
            where = "Redis" if self.settings.redis_url else "the job records database"
            return False, f"{where} is not reachable"
        if (low := self._low_disk()) is not None:
            return False, low
        if not self.workers():
            return True, "ready; no worker is alive: jobs queue until one starts"
        return True, "ready"

    def _low_disk(self) -> str | None:
        floor_gb = self.settings.min_free_disk_gb
        space = free_space(self.settings.models_cache_dir) if floor_gb > 0 else None
        if space is None or space[0] >= floor_gb * 1024**3:
            return None
        return (
            f"low disk: {space[0] / 1024**3:.2f} GB free on the store's filesystem "
            f"({self.settings.models_cache_dir}), below REALIGN_MIN_FREE_DISK_GB={floor_gb:g}"
        )

    def store_usage(self) -> dict[str, Any]:
        items = self.store.artifacts()
        return {
            "root": str(self.store.root),
            "used_bytes": sum(a.size for a in items),
            "budget_bytes": self.store.budget_bytes,
            "artifacts": len(items),
        }

    def residuals(self) -> list[dict[str, Any]]:
        """Stored packs, each with how it stores R (format, lossless or not) where its
        manifest is at hand on this node."""
        out = []
        for a in self.store.artifacts("residuals"):
            item = _artifact(a)
            try:
                m = read_residual_manifest(Path(a.path))
            except (OSError, ValueError, ArtifactCorruptError):
                m = None
            if m is not None:
                item |= {"format": m.dtype, "lossless": m.exact}
            out.append(item)
        return out

    def residual(self, key: str) -> dict[str, Any]:
        from app.merge import inspect

        full = self.store.resolve(key)
        manifest = inspect(full, self.store, self.settings)
        storage = manifest.storage() if isinstance(manifest, ResidualManifest) else None
        return {"key": full, "storage": storage, "manifest": manifest.model_dump(mode="json")}

    def delete_residual(self, key: str) -> None:
        self.store.remove(self.store.resolve(key))

    def models(self) -> list[ModelEntry]:
        return self.records.models()

    def metrics(self) -> dict[str, Any]:
        return {
            "jobs_by_status": self.records.count_by_status(),  # index sizes: no record read
            **self.records.stats(),
            "queue_depths": self.queue_depths(),
            "workers_alive": len(self.workers()),
        }

    # `list` comes last: in the class body it would shadow the builtin in annotations.
    def list(
        self,
        caller: Caller,
        *,
        status: JobStatus | None = None,
        all_callers: bool = False,
        offset: int = 0,
        limit: int = 50,
    ) -> tuple[list[JobRecord], int]:
        owner = None if (all_callers and caller.is_admin) else caller.name
        return self.records.page(owner, status, offset, limit)


def _indexed(records: JobRecords) -> JobRecords:
    try:
        records.ensure_indexes()
    except RecordsUnavailableError as exc:  # the records come back later: serve anyway
        log.warning("job index check skipped: %s", exc)
    return records


def _artifact(a: Any) -> dict[str, Any]:
    return {
        "key": a.key,
        "kind": a.kind,
        "size_bytes": a.size,
        "last_used": a.last_used,
        "in_use": a.in_use,
    }
