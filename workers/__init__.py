"""Celery worker entry point and per-process set-up (see the job service)."""
