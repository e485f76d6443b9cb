"""Celery application factory: explicit task names, JSON only, late acks for long GPU jobs."""

from __future__ import annotations

import base64
import json
from typing import Any

from app.core.errors import UnsafeSettingsError
from app.core.settings import Settings

TASK_VALIDATE = "realign.validate"
TASK_MERGE = "realign.merge"
TASK_MERGE_SHARD = "realign.merge_shard"  # one output shard of a split merge
TASK_ASSEMBLE = "realign.assemble"  # publishes a split merge once every shard is written
QUEUES = {TASK_VALIDATE: "cpu", TASK_MERGE: "gpu", TASK_MERGE_SHARD: "gpu", TASK_ASSEMBLE: "cpu"}
# kombu keeps priority sub-queues as "<name>\x06\x16<n>" beside "<name>", and messages
# delivered but not yet acknowledged in the "unacked" hash as [message, exchange, key]
PRIORITY_SEP = "\x06\x16"
UNACKED = "unacked"


def queue_keys(name: str) -> list[str]:
    """The Redis lists of broker queue ``name`` (its priority sub-queues included)."""
    return [name] + [f"{name}{PRIORITY_SEP}{p}" for p in range(1, 10)]


def jobs_in_broker(client: Any) -> set[str]:
    """Ids of the jobs that have a message in the Redis broker (any step: validate,
    merge, a shard or the final task of a split merge): waiting
    in a queue, or delivered to a worker and not acknowledged yet (running, or held for
    a retry's countdown). Reads every message: call it only when a job looks lost.

    Args:
        client: a redis-py client of the broker (decoded responses).
    """
    pipe = client.pipeline(transaction=False)
    for name in sorted(set(QUEUES.values())):
        for key in queue_keys(name):
            pipe.lrange(key, 0, -1)
    pipe.hvals(UNACKED)
    *lists, unacked = pipe.execute()
    payloads = [raw for found in lists for raw in found]
    payloads += [json.dumps(json.loads(raw)[0]) for raw in unacked]
    return {job for raw in payloads if (job := _job_of(raw)) is not None}


def _job_of(raw: str) -> str | None:
    """The job id a Celery message (protocol 2, JSON body) carries, if it is ours."""
    try:
        msg = json.loads(raw)
        if msg["headers"]["task"] not in QUEUES:
            return None
        body = msg["body"]
        if msg["properties"].get("body_encoding") == "base64":
            body = base64.b64decode(body)
        args = json.loads(body)[0]
        return str(args[0])
    except (ValueError, KeyError, IndexError, TypeError):
        return None  # not a task message of this service


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
