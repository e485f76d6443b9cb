"""One job run in this process and followed to its end: what a command line does with the
job service (``realign sweep`` runs the job ``POST /merge`` would queue)."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from types import TracebackType

from app.core.errors import JobNotFoundError, JobStateError
from app.core.settings import Settings
from app.jobs.broker import TASK_MERGE, TASK_VALIDATE
from app.jobs.dispatch import ThreadDispatcher
from app.jobs.models import Caller, JobEvent, JobRecord, JobStage, JobStatus, MergeSpec
from app.jobs.service import JobService

# The owner of the jobs a command line runs: the caller the API sees without keys.
LOCAL = Caller(name="local", role="admin")
OnEvent = Callable[[JobEvent], None]


class LocalJobs:
    """The embedded job service (SQLite records in the store, an in-process worker),
    running only the jobs submitted here: a server sharing the store keeps its own.

    Args:
        settings: the store, device and limits the job runs with.
        poll_s: how often the job's record and events are read.
    """

    def __init__(self, settings: Settings, poll_s: float = 0.25) -> None:
        self.service = JobService.in_process(settings, adopt=False)
        self.poll_s = poll_s

    def __enter__(self) -> LocalJobs:
        self.service.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.service.stop()

    def submit(self, spec: MergeSpec) -> tuple[JobRecord, bool]:
        """Record and queue ``spec`` as ``POST /merge`` does.

        Returns:
            The job, and whether it was created (False: an identical job of this store
            was in flight, and that one is returned).
        """
        return self.service.submit(spec, LOCAL)

    def wait(self, job_id: str, on_event: OnEvent) -> JobRecord:
        """Follow the job to its end, each event to ``on_event``; a first Ctrl-C cancels
        the job (and waits for it to stop), a second one leaves. Its final record."""
        seen = [0]

        def seen_then(event: JobEvent) -> None:
            seen[0] = event.seq
            on_event(event)

        try:
            return self.follow(job_id, seen_then)
        except KeyboardInterrupt:
            with contextlib.suppress(JobStateError):  # it ended meanwhile
                self.service.cancel(job_id, LOCAL)
            return self.follow(job_id, on_event, seen[0])

    def follow(self, job_id: str, on_event: OnEvent, after: int = 0) -> JobRecord:
        """Pass on the job's events until it ends; its final record."""
        records = self.service.records
        while True:
            rec = records.get(job_id)
            if rec is None:
                raise JobNotFoundError(f"job {job_id}: its record is gone from the store")
            for event in records.events(job_id, after):
                on_event(event)
                after = event.seq
            if rec.status.terminal:
                return rec
            self._take_on(rec)
            time.sleep(self.poll_s)

    def _take_on(self, rec: JobRecord) -> None:
        """Run ``rec`` here when nothing else will: an identical job an earlier command left
        unfinished (killed, or left with a second Ctrl-C), which no live worker holds or
        has queued, would otherwise be followed for ever. A server sharing the records
        (alive by its heartbeat) keeps its jobs; the job's lease keeps two runs apart."""
        dispatcher = self.service.dispatcher
        assert isinstance(dispatcher, ThreadDispatcher)
        records = self.service.records
        if rec.stage == JobStage.load or rec.id in dispatcher.pending():
            return
        if records.lease_holder(rec.id) is not None:
            return
        if any(w.name != dispatcher.name for w in records.workers()):
            return
        preflight_done = rec.status == JobStatus.queued and rec.stage == JobStage.preflight
        validated = rec.status == JobStatus.running or preflight_done
        dispatcher.send(TASK_MERGE if validated else TASK_VALIDATE, rec.id)
