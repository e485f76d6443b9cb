"""Final job states are written even when the records are down for a while.

A job that ended while its records could not be written (Redis restarting, the
embedded SQLite file on a full disk) keeps its final state here and every heartbeat
tries again, so no job stays ``running`` once the records accept writes.
"""

from __future__ import annotations

import logging
import threading
import time

from app.jobs.models import JobRecord
from app.jobs.records import JobFinishedError, JobRecords

log = logging.getLogger("app.jobs")
RETRY_PAUSES_S = (0.2, 1.0, 3.0)  # a failed final write is retried after these pauses


class FinalWriter:
    """Writes final states of jobs (record, closing event, in-flight claim)."""

    def __init__(self, records: JobRecords) -> None:
        self.records = records
        self._unwritten: dict[str, JobRecord] = {}
        self._lock = threading.Lock()

    def write(self, rec: JobRecord, nbytes: int = 0) -> None:
        """Write ``rec`` (a terminal record), retrying briefly; keep it for the heartbeat
        when the records still refuse it."""
        for pause in (*RETRY_PAUSES_S, None):
            try:
                self._write(rec)
                break
            except JobFinishedError as exc:  # the first final state written stays
                log.warning("job %s: %s", rec.id, exc)
                return
            except Exception as exc:
                if pause is None:
                    what = "job %s: its final state (%s) could not be recorded (%s); retrying"
                    log.error(what, rec.id, rec.status.value, exc)
                    with self._lock:
                        self._unwritten[rec.id] = rec
                    return
                time.sleep(pause)
        try:
            self.records.record_finish(rec, nbytes)
        except Exception as exc:  # statistics only
            log.warning("job %s: statistics not recorded (%s)", rec.id, exc)

    def flush(self) -> None:
        """Write the final states that could not be written when their job ended."""
        with self._lock:
            pending = list(self._unwritten.values())
        for rec in pending:
            try:
                self._write(rec)
            except JobFinishedError as exc:  # ended meanwhile (the reaper): that state stays
                log.warning("job %s: %s", rec.id, exc)
            except Exception as exc:
                log.warning("job %s: final state still not recorded (%s)", rec.id, exc)
                continue
            with self._lock:
                self._unwritten.pop(rec.id, None)
            log.info("job %s: final state %s recorded", rec.id, rec.status.value)

    def _write(self, rec: JobRecord) -> None:
        saved = self.records.save(rec)
        message = rec.error.message if rec.error else rec.status.value
        self.records.add_event(saved, "status", message)
        self.records.unclaim(f"inflight:{rec.owner}:{rec.fingerprint}", rec.id)
