"""A job's lease while a worker runs one of its steps, and the jobs nobody runs.

The lease (a compare-and-set key with a TTL) keeps a redelivered message from running
a step twice at once. A worker renews it every third of its TTL; one that finds
another holder on it has lost the job (its lease lapsed during a records outage and
the job moved on without it): it stops its merge through the same cancellation flag a
user's cancel sets, and writes nothing more.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from datetime import timedelta
from types import TracebackType

from app.jobs.failures import lost_message
from app.jobs.models import JobRecord, JobStage, JobStatus, utcnow
from app.jobs.records import JobRecords
from app.jobs.shard_records import SplitRecords

log = logging.getLogger("app.jobs")


class LeaseHeldError(RuntimeError):
    """Another worker holds the job's lease: try the delivery again later."""


class LeaseKeeper:
    """Holds a job's lease for the length of a ``with`` block, renewing it.

    Args:
        records: the job records.
        job_id: the job.
        holder: this worker's name.
        ttl: seconds the lease lives without renewal.
        limit_s: how long the step may run (``REALIGN_JOB_TIME_LIMIT_S``): past it the
            step is cancelled, and a step that does not stop within two more lease
            periods (a read stuck in the kernel) gives up the lease, so that the job is
            failed or delivered again as a dead worker's. Celery's own time limits do not
            apply: workers run tasks in their main thread (the solo pool).

    Attributes:
        cancel: set when the lease is lost (and by the progress callback on a cancel);
            the merge engine stops at its next check.
        lost: set when another holder took the lease: the step must not write again.
        timed_out: set when the step ran past ``limit_s`` (``cancel`` is set too).
        gave_up: set when the lease was given up after the grace: the step may write
            its end only if it takes the lease again (nobody else took the job).
    """

    def __init__(
        self,
        records: JobRecords,
        job_id: str,
        holder: str,
        ttl: float,
        limit_s: float | None = None,
    ) -> None:
        self.records, self.job_id, self.holder, self.ttl = records, job_id, holder, ttl
        self.limit_s = limit_s
        self.cancel = threading.Event()
        self.lost = threading.Event()
        self.timed_out = threading.Event()
        self.gave_up = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._started = time.monotonic()

    def __enter__(self) -> LeaseKeeper:
        """Take the lease.

        Raises:
            LeaseHeldError: another holder has it.
            RecordsUnavailableError: the records cannot be reached (nothing changed).
        """
        if not self.records.acquire_lease(self.job_id, self.holder, self.ttl):
            raise LeaseHeldError(self.job_id)
        self._started = time.monotonic()
        self._thread = threading.Thread(target=self._keep, daemon=True)
        self._thread.start()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        try:
            self.records.release_lease(self.job_id, self.holder)
        except Exception as err:  # it expires on its own
            log.warning("job %s: lease not released (%s)", self.job_id, err)

    def _wait(self) -> float:
        """Seconds until the next renewal (sooner when the time limit falls before)."""
        beat = self.ttl / 3
        if self.limit_s is None or self.timed_out.is_set():
            return beat
        return max(0.0, min(beat, self._started + self.limit_s - time.monotonic()))

    def _past_limit(self) -> bool:
        """Cancel the step at its time limit; True once it outlived the grace after it
        (the lease is then given up)."""
        if self.limit_s is None:
            return False
        over = time.monotonic() - self._started - self.limit_s
        if over >= 0 and not self.timed_out.is_set():
            log.warning("job %s: past its time limit (%g s); stopping it", self.job_id,
                        self.limit_s)  # fmt: skip
            self.timed_out.set()
            self.cancel.set()
        if over < 2 * self.ttl:
            return False
        log.error("job %s: still running %.0f s past its time limit; giving up its lease",
                  self.job_id, over)  # fmt: skip
        self.gave_up.set()
        return True

    def _keep(self) -> None:
        while not self._stop.wait(self._wait()):
            if self._past_limit():
                return
            try:
                if not self.records.acquire_lease(self.job_id, self.holder, self.ttl):
                    log.warning(
                        "job %s: lease taken over by another holder; stopping this run "
                        "without writing its record",
                        self.job_id,
                    )
                    self.lost.set()
                    self.cancel.set()
                    return
                # Steps without tensor progress (evaluations) see a cancel request here.
                if self.records.cancel_requested(self.job_id):
                    self.cancel.set()
            except Exception as exc:  # Redis restarting: keep working, retry next beat
                log.warning("job %s: lease renewal failed (%s)", self.job_id, exc)


def orphans(records: JobRecords, ttl: float, max_deliveries: int) -> list[JobRecord]:
    """Jobs whose step stopped without an outcome and that no lease holds: ``running``
    or ``queued`` ones whose last allowed delivery died (a delivery is counted before
    the move to running), and ``validating`` ones nothing wrote for longer than a lease
    (a live validation holds the lease). A job never delivered is only waiting in the
    queue and is left alone; one with deliveries left will be delivered again; one split
    into shard tasks is theirs to end.
    """
    cutoff = utcnow() - timedelta(seconds=ttl)
    ids = [*records.running()]
    ids += records.with_status(JobStatus.queued) + records.with_status(JobStatus.validating)
    out = []
    for job_id in ids:
        rec = records.get(job_id)
        if rec is None or rec.status.terminal or rec.stage == JobStage.load:
            continue
        if rec.status != JobStatus.running and rec.updated_at > cutoff:
            continue
        if rec.status != JobStatus.validating and rec.deliveries < max_deliveries:
            continue
        if _split_running(records, job_id):
            continue  # its shard tasks hold their own leases, and end it themselves
        if records.lease_holder(job_id) is None:
            out.append(rec)
    return out


def _split_running(records: JobRecords, job_id: str) -> bool:
    """Whether ``job_id`` was split into shard tasks that have not ended it: the merge
    task that split it returned (and gave up the job's lease) once it queued them."""
    split = SplitRecords(records.kv, job_id)
    return split.plan() is not None and split.ended() is None


def reap(
    records: JobRecords,
    holder: str,
    ttl: float,
    max_deliveries: int,
    fail: Callable[[JobRecord, str], None],
) -> list[str]:
    """Fail (through ``fail(rec, message)``) the :func:`orphans`: those whose last
    allowed delivery died with its worker, so none stays ``running`` waiting for a
    delivery that would only fail it, and validations left behind. Each is taken under
    the job's lease as ``holder``, so a live worker's job is never touched.

    Returns:
        The ids of the jobs failed.
    """
    reaped = []
    for seen in orphans(records, ttl, max_deliveries):
        if not records.acquire_lease(seen.id, holder, ttl):
            continue  # a live worker is on it
        try:
            rec = records.get(seen.id)
            if rec is not None and (rec.status, rec.stage) == (seen.status, seen.stage):
                fail(rec, _lost(rec))
                reaped.append(rec.id)
        finally:
            records.release_lease(seen.id, holder)
    return reaped


def _lost(rec: JobRecord) -> str:
    if rec.status == JobStatus.validating:
        return (
            "validation stopped without an outcome (its worker died or could not write "
            "the job's record) — check worker logs and the records store, then resubmit"
        )
    return lost_message(rec.deliveries)
