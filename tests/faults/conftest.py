"""Fixtures the fault tests share with the job tests (a private redis-server per test)."""

from tests.jobs.conftest import redis_server

__all__ = ["redis_server"]
