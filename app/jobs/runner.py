"""What a worker does with a job id: validate, then merge, recording every step.

Shared by the Celery tasks (``workers/``) and the embedded in-process worker, so
both modes behave identically. Every step is idempotent: artifacts are
content-addressed, a finished job is never run again, a lease keeps a redelivered
message from running the merge twice at once, and deliveries are counted so a job
that kills its worker fails instead of looping.
"""

from __future__ import annotations

import gc
import logging
import time
from collections.abc import Callable
from datetime import timedelta
from typing import TYPE_CHECKING

from app.core.errors import OperationCancelledError, RealignError
from app.core.settings import Settings
from app.jobs.failures import (
    drop_tracebacks,
    job_error,
    lost_message,
    partial_result,
    time_limit_message,
)
from app.jobs.finals import FinalWriter
from app.jobs.lease import LeaseHeldError, LeaseKeeper, reap
from app.jobs.loads import LoadWatcher
from app.jobs.models import (
    JobError,
    JobRecord,
    JobResult,
    JobStage,
    JobStatus,
    MergeSpec,
    utcnow,
)
from app.jobs.outcome import checkpoint, conclude, residual_only
from app.jobs.records import JobFinishedError, JobRecords
from app.jobs.reporter import JobReporter
from app.jobs.requests import residual_inputs
from app.jobs.requeue import Pending, Requeuer
from app.store.base import Store

if TYPE_CHECKING:
    from app.jobs.fanout import Fanout, ShardQueue

log = logging.getLogger("app.jobs")
Enqueue = Callable[[str, str], None]  # (task name, job id)
__all__ = ["JobRunner", "LeaseHeldError"]


class JobRunner:
    """Runs job steps for one worker.

    Args:
        records: the job records.
        settings: store location, device, delivery cap.
        worker: this worker's name (lease holder).
        enqueue: how to queue the next step (Celery send_task or the embedded queue).
        shards: where the tasks of a merge split by output shard go; None runs every
            merge as one task (the embedded worker).
        pending: the ids of the jobs with a message in the queue, for housekeeping to
            re-send lost ones (see :mod:`app.jobs.requeue`); None: it never does.
    """

    def __init__(
        self,
        records: JobRecords,
        settings: Settings,
        worker: str,
        enqueue: Enqueue,
        shards: ShardQueue | None = None,
        pending: Pending | None = None,
    ) -> None:
        self.records = records
        self.settings = settings
        self.worker = worker
        self.enqueue = enqueue
        self.lease_s = settings.job_lease_s
        self.current_job: str | None = None
        self.finals = FinalWriter(records)  # final states survive a records outage
        self._store: Store | None = None
        self._next_bucket_sweep = 0.0
        self.loads = LoadWatcher(records, settings, worker, self.finals)
        self.requeue = Requeuer(self, pending)
        self.fanout: Fanout | None = None
        if shards is not None:
            from app.jobs.fanout import Fanout

            self.fanout = Fanout(self, shards)

    @property
    def store(self) -> Store:
        """The store these settings configure (built on first use, then kept)."""
        if self._store is None:
            from app.jobs.locks import cluster_store

            self._store = cluster_store(self.settings)
        return self._store

    # -- steps ----------------------------------------------------------------------------
    def validate(self, job_id: str) -> None:
        """Preflight (headers only) on a light worker; queue the merge when it passes."""
        rec = self._live(job_id)
        if rec is None:
            return
        try:
            lease = LeaseKeeper(self.records, job_id, self.worker, self.lease_s)
            with lease:  # a live validation holds it: the reaper leaves the job alone
                self._validate(rec)
        except LeaseHeldError:  # another delivery validates or merges it right now
            log.info("job %s: another worker holds it; validation message dropped", job_id)

    def _validate(self, rec: JobRecord) -> None:
        from app.merge import preflight

        try:  # every write too: a records outage ends the job, never leaves it validating
            rec = self._move(rec, JobStatus.validating, JobStage.preflight)
            rec = self._pin(rec)
            s = self._spec(rec)
            if s.target is not None:
                lineage = preflight(
                    target=s.target,
                    base=s.base,
                    instruct=s.instruct,
                    residual=s.residual,
                    alpha=s.alpha,
                    force=s.force,
                    store=self.store,
                    method=s.method,
                    params=dict(s.params),
                    residuals=residual_inputs(s),
                    settings=self.settings,
                )
                if lineage is not None:
                    self.records.add_event(rec, "log", f"lineage: {lineage.summary()}")
            self._move(rec, JobStatus.queued, JobStage.preflight, "preflight passed")
            self.enqueue("realign.merge", rec.id)
        except Exception as exc:
            self._fail_on(rec, exc)

    def merge(self, job_id: str) -> None:
        """The heavy step: residual (computed or reused), apply, publish, register.

        Raises:
            LeaseHeldError: another delivery of this job is running (or its dead worker's
                lease has not expired yet); retry later.
        """
        rec = self._live(job_id)
        if rec is None:
            return
        limit = self.settings.job_time_limit_s
        with LeaseKeeper(self.records, job_id, self.worker, self.lease_s, limit) as lease:
            self.current_job = job_id
            try:
                # Counted only once the lease is ours: retries while another delivery
                # holds it are not deliveries; a worker that died mid-merge is. A job
                # whose last allowed delivery died fails here (or in reap) without
                # running again. A records outage here ends the job (no retry counted).
                done = self.records.deliveries(job_id)
                if done >= self.settings.max_deliveries:
                    self._fail(rec, "worker_lost", lost_message(done))
                    return
                self.records.count_delivery(job_id)
            except Exception as exc:
                self._fail_on(rec, exc)
                return
            try:
                self._run_merge(rec, lease)
            finally:
                self.current_job = None

    def reap(self) -> list[str]:
        """Fail the jobs whose step stopped without an outcome and that no lease holds
        (see :func:`app.jobs.lease.reap`); called by every heartbeat. Returns their ids."""
        return reap(
            self.records,
            f"{self.worker}/reaper",  # never the merge's own lease holder
            self.lease_s,
            self.settings.max_deliveries,
            lambda rec, message: self._fail(rec, "worker_lost", message),
        )

    def housekeeping(self) -> None:
        """Periodic duties of a worker: write final states that failed to be written,
        fail jobs of dead workers, re-send lost messages, drop records past their
        retention."""
        self.finals.flush()
        self.reap()
        self.requeue.sweep()
        self.requeue.sweep_splits()
        if self.fanout is not None:
            self.fanout.sweep()
        self._sweep_bucket()
        cutoff = utcnow() - timedelta(days=self.settings.job_retention_days)
        while self.records.purge_finished(cutoff) > 0:
            pass

    def _sweep_bucket(self) -> None:
        """Uploads that dead builders left in the object store's staging prefix (older
        than a day are removed; looked at hourly, by every worker)."""
        now = time.monotonic()
        if not self.settings.store_url or now < self._next_bucket_sweep:
            return
        self._next_bucket_sweep = now + 3600
        from app.store.objects import ObjectStore

        st = self.store
        if isinstance(st, ObjectStore):
            try:
                if removed := st.bucket.sweep_staging():
                    log.info("removed %d staging objects of dead builders", removed)
            except RealignError as exc:  # the store is down: the next sweep tries again
                log.warning("object store staging not swept: %s", exc)

    # -- internals ------------------------------------------------------------------------
    def _run_merge(self, rec: JobRecord, lease: LeaseKeeper) -> None:
        rec = rec.model_copy(update={"started_at": rec.started_at or utcnow()})
        cancel = lease.cancel  # set by a cancel request, or when the lease was lost
        reporter = JobReporter(self, rec, cancel)
        try:
            rec = reporter.rec = self._move(rec, JobStatus.running, JobStage.residual)
            if rec.kind == "eval":
                from app.jobs.evaljobs import run_eval_job

                outcome = run_eval_job(self, rec, reporter, cancel)
            elif rec.spec.target is None:
                outcome = residual_only(self, rec, reporter, cancel)
            elif rec.spec.sweep is not None:
                from app.jobs.sweep import run_sweep

                outcome = run_sweep(self, rec, reporter, cancel)
            elif rec.spec.serve and rec.spec.serve_mode == "in_engine":
                from app.jobs.inline import run_in_engine

                outcome = run_in_engine(self, rec, reporter, cancel)
            # A merge with an evaluation runs whole here: its final step would otherwise
            # evaluate on a light worker, out of reach of this lease's cancel.
            elif (
                self.fanout is not None
                and rec.spec.eval is None
                and self.fanout.dispatch(rec, reporter, cancel)
            ):
                return  # the shard tasks run it; the last one's final task ends the job
            else:
                outcome = checkpoint(self, rec, reporter, cancel)
            reporter.check()  # a lost lease or a cancel after the last tensor
            rec = (self.records.get(rec.id) or reporter.rec).model_copy(
                update={"progress": reporter.rec.progress}
            )
            conclude(self, rec, outcome, reporter)  # evaluated, then registered
        except Exception as exc:  # every fault ends the job, none leaves it running
            if lease.lost.is_set():  # the job is another holder's now: write nothing
                log.warning("job %s: run stopped after its lease was lost (%s)", rec.id, exc)
            elif lease.timed_out.is_set():
                if lease.gave_up.is_set() and not self.records.acquire_lease(
                    rec.id, self.worker, self.lease_s
                ):  # a stuck step given up on: another delivery has the job now
                    log.warning("job %s: stopped past its time limit; job taken over", rec.id)
                else:
                    message = time_limit_message(self.settings.job_time_limit_s)
                    self._fail(reporter.rec, "time_limit", message)
            elif isinstance(exc, OperationCancelledError):
                error = JobError(code=exc.code, message=str(exc))
                self._finish(reporter.rec, JobStatus.cancelled, error=error)
            else:
                self._fail_on(reporter.rec, exc)

    def _live(self, job_id: str) -> JobRecord | None:
        rec = self.records.get(job_id)
        if rec is None:
            log.warning("job %s: no record (expired or never created); dropping", job_id)
            return None
        if rec.status.terminal:
            return None
        if self.records.cancel_requested(job_id):
            self._finish(
                rec,
                JobStatus.cancelled,
                error=JobError(code="cancelled", message="cancelled before it ran"),
            )
            return None
        return rec

    def _move(
        self, rec: JobRecord, status: JobStatus, stage: JobStage | None, message: str = ""
    ) -> JobRecord:
        rec = self.records.save(rec.model_copy(update={"status": status, "stage": stage}))
        self.records.add_event(rec, "status", message or f"{status.value}: {stage or ''}")
        log.info("job %s %s %s", rec.id, status.value, stage.value if stage else "")
        return rec

    def _fail(self, rec: JobRecord, code: str, message: str) -> None:
        self._finish(rec, JobStatus.failed, error=JobError(code=code, message=message))

    def _fail_on(self, rec: JobRecord, exc: Exception) -> None:
        """End the job failed for ``exc``; the traceback goes to the log, not the record."""
        if isinstance(exc, JobFinishedError):  # ended elsewhere (reaper, cancel): it stays
            log.warning("job %s: %s; this run stops", rec.id, exc)
            return
        if not isinstance(exc, RealignError):
            log.error("job %s: stage %s raised", rec.id, rec.stage, exc_info=exc)
        # The traceback's frames may still hold the partial output's open files: on a
        # full disk their space comes back only once those are gone, before the numbers
        # are measured and the record is written.
        drop_tracebacks(exc)
        gc.collect()
        error = job_error(exc, rec.stage, self.settings.models_cache_dir, rec.id)
        self._finish(rec, JobStatus.failed, error=error, result=partial_result(exc))

    def _pin(self, rec: JobRecord) -> JobRecord:
        """Resolve the job's refs once (Hub revisions to commits, a residual key prefix
        to its full key) and keep them on the record: the merge uses these."""
        from app.jobs.pins import pin_refs

        pins = pin_refs(rec.spec, self.store, self.settings.trusted_code_sha256)
        if pins == rec.resolved:
            return rec
        return self.records.save(rec.model_copy(update={"resolved": pins}))

    # The split merge (app.jobs.fanout) moves and ends jobs the same way.
    def move(
        self, rec: JobRecord, status: JobStatus, stage: JobStage | None, message: str = ""
    ) -> JobRecord:
        return self._move(rec, status, stage, message)

    def finish(
        self,
        rec: JobRecord,
        status: JobStatus,
        *,
        error: JobError | None = None,
        result: JobResult | None = None,
        nbytes: int = 0,
    ) -> None:
        self._finish(rec, status, error=error, result=result, nbytes=nbytes)

    def job_spec(self, rec: JobRecord) -> MergeSpec:
        return self._spec(rec)

    @staticmethod
    def _spec(rec: JobRecord) -> MergeSpec:
        """The job's spec with its pinned refs."""
        from app.jobs.pins import apply_pins

        return apply_pins(rec.spec, rec.resolved) if rec.resolved else rec.spec

    def _finish(
        self,
        rec: JobRecord,
        status: JobStatus,
        *,
        result: JobResult | None = None,
        error: JobError | None = None,
        nbytes: int = 0,
    ) -> None:
        rec = rec.model_copy(
            update={"status": status, "result": result, "error": error, "finished_at": utcnow()}
        )
        log.info("job %s %s%s", rec.id, status.value, f": {error.message}" if error else "")
        self.finals.write(rec, nbytes)
