"""Task bodies: parse the job id, call the runner, map 'lease held' to a retry."""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path
from typing import Any

from celery import signals
from celery.utils.time import get_exponential_backoff_interval

from app.core.errors import RecordsUnavailableError
from app.core.settings import get_settings
from app.jobs.broker import QUEUES, TASK_MERGE, TASK_VALIDATE, jobs_in_broker
from app.jobs.dispatch import HEARTBEAT_S
from app.jobs.kv import RedisKV
from app.jobs.models import WorkerInfo
from app.jobs.records import JobRecords
from app.jobs.runner import JobRunner, LeaseHeldError
from workers.celery_app import celery_app

log = logging.getLogger("app.workers")
_state: dict[str, Any] = {}
TRANSIENT = (ConnectionError, TimeoutError, RecordsUnavailableError)
TRANSIENT_RETRIES = 5  # then the message is dropped; housekeeping re-sends it later


def runner(hostname: str = "") -> JobRunner:
    """This process's runner (built on first use, after the worker forked)."""
    if "runner" not in _state:
        settings = get_settings()
        assert settings.redis_url is not None
        kv = RedisKV(settings.redis_url)  # the broker's Redis too
        records = JobRecords(kv)
        name = hostname or f"worker@{os.uname().nodename}:{os.getpid()}"

        def enqueue(task: str, job_id: str) -> None:
            celery_app.send_task(task, args=[job_id], queue=QUEUES[task])

        from workers.shard_tasks import CeleryShardQueue

        _state["runner"] = JobRunner(
            records,
            settings,
            name,
            enqueue,
            CeleryShardQueue(),
            pending=lambda: jobs_in_broker(kv.client),
        )
    return _state["runner"]  # type: ignore[no-any-return]


def _retry(task: Any, job_id: str, tries: int, exc: Exception) -> None:
    """Try again later after a transient fault (the records unreachable), counted apart
    from waits for a held lease; after the last try the message is dropped: say so,
    naming the job and what happens next."""
    if tries >= TRANSIENT_RETRIES:
        after = runner(task.request.hostname).settings.job_requeue_after_s
        log.error(
            "job %s: %s gave up after %d tries (%s); its message is dropped and the job "
            "stays as it is — worker housekeeping sends it again once the job has sat "
            "%g s with no message (REALIGN_JOB_REQUEUE_AFTER_S)",
            job_id,
            task.name,
            tries + 1,
            exc,
            after,
        )
        return
    countdown = get_exponential_backoff_interval(1, tries, 600, True)
    raise task.retry(
        args=[job_id], kwargs={"transient": tries + 1}, exc=exc, countdown=countdown
    ) from None


# max_retries=None: waiting out a held lease has no cap (the lease expires unless a
# live worker renews it); transient faults are capped in _retry.
@celery_app.task(name=TASK_VALIDATE, bind=True, max_retries=None)
def validate(self: Any, job_id: str, transient: int = 0) -> None:
    try:
        runner(self.request.hostname).validate(job_id)
    except TRANSIENT as exc:
        _retry(self, job_id, transient, exc)


@celery_app.task(name=TASK_MERGE, bind=True, max_retries=None)
def merge(self: Any, job_id: str, transient: int = 0) -> None:
    r = runner(self.request.hostname)
    try:
        r.merge(job_id)
    except TRANSIENT as exc:
        _retry(self, job_id, transient, exc)
    except LeaseHeldError:
        # A previous delivery may still be running (or died holding the lease): come back
        # when the lease would have expired rather than running the merge twice at once.
        # The countdown stays well below the visibility timeout: a delayed message held
        # past it would be redelivered again by Redis.
        settings = r.settings  # the runner's, not read again
        wait = min(settings.job_lease_s / 2, settings.visibility_timeout_s / 4)
        raise self.retry(countdown=wait, max_retries=None) from None


def _beat(hostname: str, queues: list[str], stop: threading.Event) -> None:
    settings = get_settings()
    while not stop.is_set():
        try:
            r = runner(hostname)
            r.records.heartbeat(
                WorkerInfo(
                    name=hostname,
                    device=settings.device,
                    queues=queues,
                    pid=os.getpid(),
                    current_job=r.current_job,
                )
            )
        except Exception as exc:  # Redis restarting: try again next beat
            log.warning("heartbeat failed: %s", exc)
        _touch(settings.worker_alive_file)
        try:
            runner(hostname).housekeeping()
        except Exception as exc:
            log.warning("job housekeeping failed: %s", exc)
        stop.wait(HEARTBEAT_S)


def _touch(path: Path | None) -> None:
    """Mark this process alive for a container probe: the beat thread runs, whether or
    not Redis answers (a Redis restart must not get workers killed mid-merge)."""
    if path is None:
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch()
    except OSError as exc:
        log.warning("cannot touch the liveness file %s: %s", path, exc)


@signals.worker_init.connect
def _on_init(**_: Any) -> None:
    """Refuse to start a worker whose device is not here (SystemExit passes through
    Celery's signal dispatch, which logs and swallows other exceptions)."""
    from app.core.errors import DeviceUnavailableError
    from app.residuals.devices import check_device

    try:
        check_device(get_settings().device)
    except DeviceUnavailableError as exc:
        raise SystemExit(f"realign worker: REALIGN_DEVICE: {exc}") from None


@signals.worker_ready.connect
def _on_ready(sender: Any = None, **_: Any) -> None:
    hostname = sender.hostname if sender is not None else ""
    queues = sorted(q.name for q in sender.app.amqp.queues.consume_from.values()) if sender else []
    stop = threading.Event()
    _state["beat_stop"] = stop
    threading.Thread(
        target=_beat, args=(hostname, queues, stop), daemon=True, name="realign-heartbeat"
    ).start()
    runner(hostname).loads.start(stop)  # ends serve:true jobs as serving replicas report


@signals.worker_shutdown.connect
def _on_shutdown(sender: Any = None, **_: Any) -> None:
    stop = _state.get("beat_stop")
    if stop is not None:
        stop.set()
    if sender is not None and "runner" in _state:
        _state["runner"].records.forget_worker(sender.hostname)
