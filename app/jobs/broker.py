"""Celery application factory: explicit task names, JSON only, late acks for long GPU jobs."""

from __future__ import annotations

from typing import Any

from app.core.errors import UnsafeSettingsError
from app.core.settings import Settings

TASK_VALIDATE = "realign.validate"
TASK_MERGE = "realign.merge"
TASK_MERGE_SHARD = "realign.merge_shard"  # one output shard of a split merge
TASK_ASSEMBLE = "realign.assemble"  # publishes a split merge once every shard is written
QUEUES = {TASK_VALIDATE: "cpu", TASK_MERGE: "gpu", TASK_MERGE_SHARD: "gpu", TASK_ASSEMBLE: "cpu"}


def check_timeouts(settings: Settings) -> None:
    """A task running past the Redis visibility timeout is handed to a second worker:
    refuse settings where the task time limit does not stay below it.

    Raises:
        UnsafeSettingsError: visibility timeout <= job time limit.
    """
    if settings.visibility_timeout_s <= settings.job_time_limit_s:
        raise UnsafeSettingsError(
            f"REALIGN_VISIBILITY_TIMEOUT_S ({settings.visibility_timeout_s}) must exceed "
            f"REALIGN_JOB_TIME_LIMIT_S ({settings.job_time_limit_s}), or Redis redelivers "
            "running merges to a second worker"
        )


def make_celery(settings: Settings) -> Any:
    """The Celery app for ``settings.redis_url`` (broker only; results live in job records)."""
    from celery import Celery

    if not settings.redis_url:
        raise UnsafeSettingsError("Celery needs REALIGN_REDIS_URL; without it run embedded")
    check_timeouts(settings)
    app = Celery("realign", broker=settings.redis_url)
    limit = settings.job_time_limit_s
    app.conf.update(
        task_serializer="json",
        accept_content=["json"],
        task_ignore_result=True,
        task_acks_late=True,  # safe: every task is idempotent (content-addressed artifacts)
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_time_limit=limit,
        task_soft_time_limit=max(1, limit - 30),
        broker_transport_options={
            "visibility_timeout": settings.visibility_timeout_s,
            # sweep for messages of dead workers often enough for the configured timeout
            "unacked_restore_interval": max(1, min(10, settings.visibility_timeout_s // 4)),
            "unacked_restore_throttle": 1,
        },
        broker_connection_retry_on_startup=True,
        task_routes={name: {"queue": queue} for name, queue in QUEUES.items()},
        task_default_queue="cpu",
        worker_hijack_root_logger=False,
    )
    return app
