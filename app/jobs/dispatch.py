"""How job steps reach a worker: Celery over Redis, or an in-process thread (embedded)."""

from __future__ import annotations

import logging
import os
import queue
import socket
import threading
import time
from typing import Any, Protocol

from app.core.errors import RecordsUnavailableError
from app.core.settings import Settings
from app.jobs.broker import QUEUES, TASK_MERGE, TASK_VALIDATE, queue_keys
from app.jobs.models import WorkerInfo
from app.jobs.records import JobRecords
from app.jobs.runner import JobRunner, LeaseHeldError

log = logging.getLogger("app.jobs")
HEARTBEAT_S = 10.0
RECORDS_RETRY_S = 2.0


class Dispatcher(Protocol):
    def send(self, task: str, job_id: str) -> None: ...
    def depths(self) -> dict[str, int]: ...
    def start(self) -> None: ...
    def stop(self) -> None: ...


class CeleryDispatcher:
    """Sends task names with a job id (JSON) to the Redis broker."""

    def __init__(self, celery_app: Any, broker: Any) -> None:
        self.celery = celery_app
        self.broker = broker  # redis client of the broker, for queue depths

    def send(self, task: str, job_id: str) -> None:
        self.celery.send_task(task, args=[job_id], queue=QUEUES[task])

    def depths(self) -> dict[str, int]:
        out = {}
        for name in sorted(set(QUEUES.values())):
            out[name] = sum(int(self.broker.llen(k)) for k in queue_keys(name))
        return out

    def start(self) -> None:
        return None

    def stop(self) -> None:
        return None


class ThreadDispatcher:
    """The embedded worker: one thread runs validate and merge steps in order.

    Args:
        records: the job records.
        settings: as the runner takes them.
        adopt: pick up the records' unfinished jobs at start and re-send lost messages
            (the service's worker); False: run only the jobs sent here (a command line
            run sharing the records with a server leaves the server's jobs alone).
    """

    def __init__(self, records: JobRecords, settings: Settings, *, adopt: bool = True) -> None:
        self.records = records
        self.name = f"embedded@{socket.gethostname()}:{os.getpid()}"
        self.adopt = adopt
        pending = self.pending if adopt else None
        self.runner = JobRunner(records, settings, self.name, self.send, pending=pending)
        self.device = settings.device
        self._q: queue.Queue[tuple[str, str] | None] = queue.Queue()
        self._threads: list[threading.Thread] = []
        self._stop = threading.Event()
        self._taken: str | None = None  # the job of the step the worker thread runs

    def send(self, task: str, job_id: str) -> None:
        self._q.put((task, job_id))

    def pending(self) -> set[str]:
        """Jobs with a step waiting in the queue or being run (none is ever lost here
        unless a step crashed; housekeeping re-sends those)."""
        with self._q.mutex:
            waiting = {item[1] for item in self._q.queue if item is not None}
        return waiting | ({self._taken} if self._taken else set())

    def depths(self) -> dict[str, int]:
        return {"embedded": self._q.qsize()}

    def start(self) -> None:
        if self._threads:
            return
        self._stop.clear()
        for target in (self._work, self._beat):
            t = threading.Thread(target=target, name=f"realign-{target.__name__[1:]}", daemon=True)
            t.start()
            self._threads.append(t)
        self._threads.append(self.runner.loads.start(self._stop))
        if self.adopt:
            self._requeue_unfinished()

    def stop(self) -> None:
        self._stop.set()
        self._q.put(None)
        for t in self._threads:
            t.join(timeout=5)
        self._threads.clear()
        self.records.forget_worker(self.name)

    def _requeue_unfinished(self) -> None:
        # Embedded jobs live only in this process: after a restart, pick them up again.
        for job_id in self.records.unfinished():
            self.send(TASK_VALIDATE, job_id)

    def _work(self) -> None:
        while (item := self._q.get()) is not None:
            task, job_id = item
            self._taken = job_id
            try:
                self._step(task, job_id)
            finally:
                self._taken = None

    def _step(self, task: str, job_id: str) -> None:
        try:
            step = self.runner.merge if task == TASK_MERGE else self.runner.validate
            step(job_id)
        except LeaseHeldError:
            time.sleep(1.0)
            self.send(task, job_id)
        except RecordsUnavailableError as exc:
            # Raised before the step changed anything (reading the job, taking its
            # lease): not a delivery. Try again once the records answer.
            log.warning("job %s: %s put off, records unavailable (%s)", job_id, task, exc)
            self._stop.wait(RECORDS_RETRY_S)
            self.send(task, job_id)
        except Exception:
            log.exception(
                "job %s: %s crashed (housekeeping re-sends or ends the job)", job_id, task
            )

    def _beat(self) -> None:
        while not self._stop.is_set():
            try:
                self.records.heartbeat(
                    WorkerInfo(
                        name=self.name,
                        device=self.device,
                        queues=["embedded"],
                        pid=os.getpid(),
                        current_job=self.runner.current_job,
                    )
                )
            except Exception as exc:
                log.warning("worker heartbeat failed: %s", exc)
            try:
                self.runner.housekeeping()
            except Exception as exc:  # records unavailable: next beat
                log.warning("job housekeeping failed: %s", exc)
            self._stop.wait(HEARTBEAT_S)
