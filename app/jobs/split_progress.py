"""Progress of a split merge: every shard task adds its bytes to the job's record."""

from __future__ import annotations

import logging
import threading
import time

from app.jobs.models import JobProgress, JobRecord, JobStage, JobStatus, utcnow
from app.jobs.records import JobRecords
from app.jobs.shard_records import SplitPlan, SplitRecords
from app.residuals.progress import Progress

log = logging.getLogger("app.jobs")
_WRITE_EVERY_S = 0.5


class ShardReporter:
    """Progress callback of one shard task: records the shard's bytes, writes the
    job's progress summed over all shards, and stops the task once the job ended
    (cancelled, or failed in another shard task).

    Args:
        records: the job records.
        split: the job's split.
        rec: the job as the task found it.
        plan: the split's plan.
        index: this task's shard.
        cancel: set to stop the task at its next chunk.
    """

    def __init__(
        self,
        records: JobRecords,
        split: SplitRecords,
        rec: JobRecord,
        plan: SplitPlan,
        index: int,
        cancel: threading.Event,
    ) -> None:
        self.records, self.split, self.rec = records, split, rec
        self.plan, self.index, self.cancel = plan, index, cancel
        self._last = 0.0

    def __call__(self, p: Progress) -> None:
        now = time.monotonic()
        if now - self._last < _WRITE_EVERY_S and p.bytes_done < p.bytes_total:
            return
        self._last = now
        try:
            self._report(p)
        except Exception as exc:  # a Redis blip must not kill a long merge
            log.warning("job %s: progress not recorded (%s)", self.rec.id, exc)

    def _report(self, p: Progress) -> None:
        self.split.set_progress(self.index, p.bytes_done, p.tensors_done)
        done, tensors = self.split.progress(len(self.plan.files))
        rec = self.records.get(self.rec.id)
        if rec is None or rec.status.terminal:
            self.cancel.set()
            return
        total = sum(self.plan.nbytes)
        took = (utcnow() - (rec.started_at or rec.created_at)).total_seconds()
        rate = done / took if took > 0 else 0.0
        progress = JobProgress(
            tensors_done=tensors,
            tensors_total=sum(self.plan.tensors),
            bytes_done=done,
            bytes_total=total,
            percent=round(100 * done / max(total, 1), 2),
            eta_seconds=(total - done) / rate if rate > 0 else None,
        )
        update = {"stage": JobStage.apply, "progress": progress, "status": JobStatus.running}
        self.rec = self.records.save(rec.model_copy(update=update))
        self.records.add_event(self.rec, "progress")
        # After the write: an end recorded before it is seen here, and the task then
        # stops through Fanout._end, which rewrites the final state over this write.
        if self.records.cancel_requested(self.rec.id) or self.split.ended() is not None:
            self.cancel.set()
