"""The job plane's side of serving: announce a published model to the serving replicas,
and end the ``serve: true`` job once they report.

Messages wake the watcher up (:data:`REPORT_CHANNEL`); the records decide. Every worker
(and the embedded one) runs a watcher; a claim lets one of them write the final state.
A sweep over the notices waiting catches messages missed while Redis was away, replicas
that died, and jobs past ``REALIGN_SERVE_LOAD_TIMEOUT_S``.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from app.core.settings import Settings
from app.handoff.board import LoadNotice
from app.handoff.bus import LOAD_CHANNEL, REPORT_CHANNEL, Bus, Subscription, make_bus
from app.handoff.verdict import Verdict, judge
from app.jobs.finals import FinalWriter
from app.jobs.models import JobError, JobRecord, JobStage, JobStatus, utcnow
from app.jobs.records import JobRecords

log = logging.getLogger("app.jobs")
SWEEP_S = 2.0  # how often the notices waiting are checked without a message
CLAIM_S = 60.0  # one watcher writes a job's end; a dead one's claim expires


class LoadWatcher:
    """Announces models to load and ends their jobs.

    Args:
        records: the job records.
        settings: how many replicas are needed (REALIGN_SERVE_REPLICAS) and for how long
            a job may wait (REALIGN_SERVE_LOAD_TIMEOUT_S).
        name: this watcher's name (holder of the claim on a job's end).
        finals: writes final states, retrying while the records are down.
        bus: the channels (Redis pub/sub, or in-process when embedded).
    """

    def __init__(
        self,
        records: JobRecords,
        settings: Settings,
        name: str,
        finals: FinalWriter,
        bus: Bus | None = None,
    ) -> None:
        self.records = records
        self.board = records.board
        self.settings = settings
        self.name = name
        self.finals = finals
        self.bus = bus if bus is not None else make_bus(settings.redis_url)

    def announce(self, job_id: str, model_id: str) -> None:
        """Tell every serving replica (now, and those that start later) to load it."""
        self.board.announce(job_id, model_id)
        self.bus.publish(LOAD_CHANNEL, job_id)

    def settle(self, job_id: str) -> Verdict | None:
        """End the job if its replicas' reports (or its wait) decide it."""
        notice = self.board.notice(job_id)
        if notice is None or notice.by != "job":
            return None  # withdrawn, or an admin's request (its caller waits for it)
        rec = self.records.get(job_id)
        if rec is None or rec.status.terminal or rec.stage != JobStage.load:
            if rec is None or rec.status.terminal:
                self.board.withdraw(job_id)  # cancelled, or ended by another watcher
            return None
        verdict = self._verdict(rec, notice)
        if verdict is None:
            return None
        if self.records.claim(f"loadend:{job_id}", self.name, CLAIM_S) != self.name:
            return None
        end: dict[str, Any]
        if verdict.status == "succeeded":
            self.records.add_event(rec, "log", verdict.message)
            end = {"status": JobStatus.succeeded, "error": None}
        else:
            error = JobError(code=verdict.code or "load_failed", message=verdict.message)
            end = {"status": JobStatus(verdict.status), "error": error}
        log.info("job %s %s: %s", job_id, verdict.status, verdict.message)
        self.finals.write(rec.model_copy(update={**end, "finished_at": utcnow()}))
        self.board.withdraw(job_id)
        return verdict

    def _verdict(self, rec: JobRecord, notice: LoadNotice) -> Verdict | None:
        if rec.cancel_requested:
            return Verdict("cancelled", "cancelled while loading", "cancelled")
        live = {r.id for r in self.board.replicas()}
        need = self.settings.replicas_needed()
        timeout = self.settings.serve_load_timeout_s
        reports = self.board.reports(rec.id)
        return judge(notice, reports, live, need, timeout, time.time())

    def sweep(self) -> None:
        for notice in self.board.pending():
            try:
                self.settle(notice.job_id)
            except Exception as exc:  # one bad notice must not stop the others
                log.warning("job %s: load not settled (%s)", notice.job_id, exc)

    def run(self, stop: threading.Event) -> None:
        """Settle jobs as replicas report, and sweep every :data:`SWEEP_S`, until ``stop``."""
        sub: Subscription | None = None
        next_sweep = 0.0
        while not stop.is_set():
            try:
                if sub is None:
                    sub = self.bus.subscribe(REPORT_CHANNEL)
                    next_sweep = 0.0  # messages may have been missed while away
                if time.monotonic() >= next_sweep:
                    self.sweep()
                    next_sweep = time.monotonic() + SWEEP_S
                job_id = sub.get(timeout=min(1.0, SWEEP_S))
                if job_id:
                    self.settle(job_id)
            except Exception as exc:  # Redis restarting: subscribe again shortly
                log.warning("load watcher: %s", exc)
                if sub is not None:
                    sub.close()
                sub = None
                stop.wait(1.0)
        if sub is not None:
            sub.close()

    def start(self, stop: threading.Event) -> threading.Thread:
        thread = threading.Thread(target=self.run, args=(stop,), name="realign-loads", daemon=True)
        thread.start()
        return thread
