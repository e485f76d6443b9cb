"""Celery entry point: ``celery -A workers.celery_app worker -Q gpu,cpu`` (or ``realign worker``).

Per-process set-up (torch threads, device check, the heartbeat that /readyz and
/admin/workers read) happens when the worker is ready, not at import time.
"""

from __future__ import annotations

from app.core.settings import get_settings
from app.jobs.broker import make_celery

celery_app = make_celery(get_settings())

import workers.shard_tasks  # noqa: E402  (registers the task names of split merges)
import workers.tasks  # noqa: E402,F401  (registers the task names)
