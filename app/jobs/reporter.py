"""Job progress from the engine's callback: throttled record updates, ETA, and the
cancellation check (an API-side cancel reaches a running merge here)."""

from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING

from app.core.errors import OperationCancelledError
from app.jobs.models import JobProgress, JobRecord, JobStage, JobStatus
from app.jobs.records import JobFinishedError
from app.residuals.progress import Progress

if TYPE_CHECKING:
    from app.jobs.runner import JobRunner

log = logging.getLogger("app.jobs")
_WRITE_EVERY_S = 0.5


class JobReporter:
    """Progress callback: throttled record updates, ETA, and cancellation checks."""

    def __init__(self, runner: JobRunner, rec: JobRecord, cancel: threading.Event) -> None:
        self.runner, self.rec, self.cancel = runner, rec, cancel
        self._last = 0.0
        self._stage_start = time.monotonic()

    def __call__(self, p: Progress) -> None:
        # "residual+apply": the first merge of a pair writes both in one pass
        stage = JobStage.residual if p.stage.startswith("residual") else JobStage.apply
        now = time.monotonic()
        changed = stage != self.rec.stage
        if changed:
            self._stage_start = now
        if not changed and now - self._last < _WRITE_EVERY_S and p.bytes_done < p.bytes_total:
            return
        self._last = now
        rate = p.bytes_done / max(now - self._stage_start, 1e-6)
        eta = (p.bytes_total - p.bytes_done) / rate if rate > 0 else None
        progress = JobProgress(
            tensors_done=p.tensors_done,
            tensors_total=p.tensors_total,
            bytes_done=p.bytes_done,
            bytes_total=p.bytes_total,
            percent=round(100 * p.fraction, 2),
            eta_seconds=eta,
        )
        try:
            self.rec = self.runner.records.save(
                self.rec.model_copy(
                    update={"stage": stage, "progress": progress, "status": JobStatus.running}
                )
            )
            self.runner.records.add_event(self.rec, "progress")
            if self.runner.records.cancel_requested(self.rec.id):
                self.cancel.set()
        except JobFinishedError as exc:  # ended elsewhere (the reaper, a cancel): stop
            log.warning("job %s: %s; stopping the merge", self.rec.id, exc)
            self.cancel.set()
        except Exception as exc:  # a Redis blip must not kill a long merge
            log.warning("job %s: progress not recorded (%s)", self.rec.id, exc)

    def check(self) -> None:
        """Raise if the merge must stop: cancelled, its lease lost, or ended elsewhere.

        Raises:
            OperationCancelledError: nothing more may be published or written.
        """
        if self.cancel.is_set():
            raise OperationCancelledError(
                f"job {self.rec.id} stopped before its result was recorded; submit it "
                "again if it is still wanted"
            )
