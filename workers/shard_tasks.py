"""Task bodies of a merge split by output shard, and how their messages are sent.

The shard tasks of a job go out as one Celery group (ids ``<job>-shard-<i>``, so a
cancel can revoke them by name); the final task is queued by whichever shard task
records the last shard: a chord whose counter and results live in the job records,
not in a result backend (the service keeps none).
"""

from __future__ import annotations

from typing import Any

from app.core.errors import RecordsUnavailableError
from app.core.settings import get_settings
from app.jobs.broker import QUEUES, TASK_ASSEMBLE, TASK_MERGE_SHARD
from app.jobs.fanout import Fanout
from app.jobs.runner import LeaseHeldError
from workers.celery_app import celery_app

TRANSIENT = (ConnectionError, TimeoutError, RecordsUnavailableError)  # as workers.tasks


def _fanout(hostname: str) -> Fanout:
    from workers.tasks import runner  # imported late: workers.tasks imports this module

    fanout = runner(hostname).fanout
    assert fanout is not None, "the Celery worker's runner always splits large merges"
    return fanout


def _retry_later(task: Any) -> Exception:
    """Come back once a dead holder's lease would have run out (see ``merge``)."""
    settings = get_settings()
    wait = min(settings.job_lease_s / 2, settings.visibility_timeout_s / 4)
    return task.retry(countdown=wait, max_retries=None)  # type: ignore[no-any-return]


@celery_app.task(
    name=TASK_MERGE_SHARD, bind=True, autoretry_for=TRANSIENT, retry_backoff=True, max_retries=5
)
def merge_shard(self: Any, job_id: str, index: int) -> None:
    try:
        _fanout(self.request.hostname).run_shard(job_id, index)
    except LeaseHeldError:
        raise _retry_later(self) from None


@celery_app.task(
    name=TASK_ASSEMBLE, bind=True, autoretry_for=TRANSIENT, retry_backoff=True, max_retries=5
)
def assemble(self: Any, job_id: str) -> None:
    try:
        _fanout(self.request.hostname).assemble(job_id)
    except LeaseHeldError:
        raise _retry_later(self) from None


def shard_task_id(job_id: str, index: int) -> str:
    return f"{job_id}-shard-{index}"


class CeleryShardQueue:
    """Sends a split merge's tasks through the Celery app of this worker."""

    def send_shards(self, job_id: str, count: int) -> None:
        from celery import group

        queue = QUEUES[TASK_MERGE_SHARD]
        group(
            merge_shard.si(job_id, i).set(task_id=shard_task_id(job_id, i), queue=queue)
            for i in range(count)
        ).apply_async()

    def send_assemble(self, job_id: str) -> None:
        celery_app.send_task(TASK_ASSEMBLE, args=[job_id], queue=QUEUES[TASK_ASSEMBLE])

    def revoke(self, job_id: str, count: int) -> None:
        # Workers that receive a revoked id drop it; running ones stop on their own when
        # their progress callback sees the job's end.
        celery_app.control.revoke([shard_task_id(job_id, i) for i in range(count)])
