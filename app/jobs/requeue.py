"""Jobs whose queue message is gone: sent again by worker housekeeping, failed after a few.

A job waits ``queued`` for its validate message, and again, after "preflight passed",
for its merge message. A message can vanish: a task that gave up its retries during
a records outage, a broker restarted without persistence or evicting keys, a crash
between recording a job and queueing it. Every worker's housekeeping looks at the
queued jobs nothing touched for ``REALIGN_JOB_REQUEUE_AFTER_S`` that no worker holds
(no lease): if the broker holds no message for one (neither waiting nor delivered),
it sends the step's message again and records that as a job event. A long queue is
no reason: its messages are in the broker; and it hides no lost one, as the sweep
walks every queued job, a page at a time. Duplicates are harmless (every step is
idempotent under the job lease); one worker per period re-sends a job, and a job
re-sent ``REALIGN_MAX_DELIVERIES`` times fails with ``message_lost`` instead of
waiting forever. ``validating`` jobs nobody runs are the reaper's (they fail).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Collection, Iterator
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

from app.jobs.broker import TASK_MERGE, TASK_VALIDATE
from app.jobs.models import JobError, JobRecord, JobStage, JobStatus, utcnow
from app.jobs.shard_records import SplitRecords

if TYPE_CHECKING:
    from app.jobs.runner import JobRunner

log = logging.getLogger("app.jobs")
MESSAGE_LOST = "message_lost"
PAGE = 500  # queued jobs read at a time; a sweep reads them all, page by page
Pending = Callable[[], Collection[str]]  # ids of the jobs with a message in the broker


def next_task(rec: JobRecord) -> str | None:
    """The message a queued job waits for: validate, or merge once preflight passed."""
    if rec.status != JobStatus.queued:
        return None
    if rec.stage is None:
        return TASK_VALIDATE
    return TASK_MERGE if rec.stage == JobStage.preflight else None


class Requeuer:
    """Re-sends the messages of queued jobs that no broker queue holds any more.

    Args:
        runner: this worker's runner (records, settings, enqueue, final states).
        pending: the ids of the jobs with a message in the broker (waiting or
            delivered); None turns the sweep off.
    """

    def __init__(self, runner: JobRunner, pending: Pending | None) -> None:
        self.runner = runner
        self.records = runner.records
        self.pending = pending
        self.after = runner.settings.job_requeue_after_s
        self.cap = runner.settings.max_deliveries
        self.holder = f"{runner.worker}/requeue"
        # Jobs seen without a message by the last sweep, with the record version seen: a
        # job is re-sent only when two sweeps in a row miss its message, so a message in
        # flight between the broker's queue and its unacked set (a worker taking it right
        # now) never looks lost.
        self._missing: dict[str, datetime] = {}
        self._split_missing: dict[str, datetime] = {}

    def sweep(self, page: int = PAGE) -> list[str]:
        """Re-send (or fail, past the cap) every queued job whose message is lost, however
        long the queue: the queued jobs are read ``page`` at a time, oldest first, so a
        backlog of waiting jobs hides no lost message behind it.

        Returns:
            The ids of the jobs re-sent or failed.
        """
        if self.pending is None:
            return []
        cutoff = utcnow() - timedelta(seconds=self.after)
        present: set[str] | None = None
        done: list[str] = []
        missing: dict[str, datetime] = {}
        for recs in self.records.queued_pages(cutoff, page):
            idle = [rec for rec in recs if self._idle(rec, cutoff)]
            if not idle:
                continue
            if present is None:  # read once, when needed: it lists every queued message
                present = set(self.pending())
            for rec in idle:
                if rec.id in present or self.records.lease_holder(rec.id) is not None:
                    continue
                if self._missing.get(rec.id) != rec.updated_at:  # first miss: confirm later
                    missing[rec.id] = rec.updated_at
                elif self._resend(rec):
                    done.append(rec.id)
        self._missing = missing
        return done

    def _idle(self, rec: JobRecord, cutoff: datetime) -> bool:
        """Whether ``rec`` waits for a message and nothing touched it since ``cutoff``."""
        return (
            rec.updated_at <= cutoff
            and next_task(rec) is not None
            and rec.deliveries < self.cap  # a merge that died too often: the reaper's
        )

    @contextlib.contextmanager
    def _taken(
        self, seen: JobRecord, still: Callable[[JobRecord], bool]
    ) -> Iterator[JobRecord | None]:
        """``seen``'s job under this sweeper's lease while the block runs; None when
        another worker re-sent it within the period, a worker holds it, or it moved on
        (``still`` says whether the record read again is as seen)."""
        if not self.records.claim_resend(seen.id, self.holder, self.after):
            yield None  # another worker re-sent it within the period
            return
        if not self.records.acquire_lease(seen.id, self.holder, self.runner.lease_s):
            yield None  # a worker took it meanwhile
            return
        try:
            rec = self.records.get(seen.id)
            yield rec if rec is not None and still(rec) else None
        finally:
            self.records.release_lease(seen.id, self.holder)

    def _note_resend(self, rec: JobRecord, what: str) -> None:
        """Count a re-send and say so in a job event and the log."""
        n = self.records.count_resend(rec.id)
        message = (
            f"message re-sent: {what} (dropped after a records outage, or lost in a broker "
            f"restart); re-send {n} of {self.cap}"
        )
        self.records.add_event(rec, "status", message)
        log.warning("job %s: %s", rec.id, message)

    def _resend(self, seen: JobRecord) -> bool:
        def same(rec: JobRecord) -> bool:
            return (rec.status, rec.stage, rec.updated_at) == (
                seen.status, seen.stage, seen.updated_at,
            )  # fmt: skip

        with self._taken(seen, same) as rec:
            if rec is None:
                return False
            task = next_task(rec)
            assert task is not None
            done = self.records.resends(rec.id)
            if done >= self.cap:
                self.runner.finish(rec, JobStatus.failed, error=self._lost(done))
                return True
            step = "validate" if task == TASK_VALIDATE else "merge"
            self._note_resend(
                rec, f"the job sat queued {self.after:g} s with no {step} message in the broker"
            )
        self.runner.enqueue(task, rec.id)  # after the release: the step takes the lease
        return True

    def sweep_splits(self) -> list[str]:
        """Re-send the shard tasks, or the final task once every shard is written, of split
        merges that wait for a message the broker no longer holds (none of the job's in
        it, no lease held, nothing written for the re-send period, two sweeps in a row);
        past the cap the job fails ``message_lost``.

        Returns:
            The ids of the jobs re-sent or failed.
        """
        fanout = self.runner.fanout
        if self.pending is None or fanout is None:
            return []
        cutoff = utcnow() - timedelta(seconds=self.after)
        present: set[str] | None = None
        done: list[str] = []
        missing: dict[str, datetime] = {}
        for job_id in self.records.running():
            rec = self.records.get(job_id)
            split = SplitRecords(self.records.kv, job_id)
            plan = split.plan() if rec is not None and rec.updated_at <= cutoff else None
            if rec is None or plan is None or split.ended() is not None:
                continue
            if self.records.lease_holder(job_id) is not None or split.leased(len(plan.files)):
                continue  # a worker is on it
            if present is None:
                present = set(self.pending())
            if job_id in present:
                continue
            if self._split_missing.get(job_id) != rec.updated_at:  # confirm next sweep
                missing[job_id] = rec.updated_at
            elif self._resend_split(rec, split, len(plan.files)):
                done.append(job_id)
        self._split_missing = missing
        return done

    def _resend_split(self, seen: JobRecord, split: SplitRecords, count: int) -> bool:
        fanout = self.runner.fanout
        assert fanout is not None

        def same(rec: JobRecord) -> bool:
            return rec.updated_at == seen.updated_at and split.ended() is None

        with self._taken(seen, same) as rec:
            if rec is None:
                return False
            resent = self.records.resends(rec.id)
            if resent >= self.cap:
                fanout.end(split, JobStatus.failed, self._lost(resent))
                return True
            final = all(r is not None for r in split.results(count))
            what = "final task" if final else "shard tasks"
            self._note_resend(
                rec, f"the split merge waited {self.after:g} s with no {what} in the broker"
            )
        if final:  # after the release: the task takes the lease
            fanout.queue.send_assemble(rec.id)
        else:  # shards already written return at once
            fanout.queue.send_shards(rec.id, count)
        return True

    def _lost(self, done: int) -> JobError:
        return JobError(
            code=MESSAGE_LOST,
            message=f"the job's queue message was lost {done + 1} times (sent again "
            f"{done} times, each after {self.after:g} s queued with no message in the "
            "broker) — check the broker (Redis persistence, maxmemory-policy "
            "noeviction) and the worker logs for task errors, then submit the job again",
        )
