"""Build locks in Redis for stores shared by several machines.

``SET name token NX PX lease`` takes a lock, a Lua compare-and-set renews or deletes
it only for the token that holds it, and ``INCR`` gives every acquisition a fencing
token larger than any before it (a builder that outlived its lease can be told from
the one that took over). The job side (runner, job service, workers, the CLI) opens
its store with :func:`cluster_store`, which hands this lock to the store factory:
the pure store never imports Redis.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import redis

from app.core.settings import Settings
from app.store.base import Store
from app.store.factory import store_from_settings

_RENEW = """
if redis.call('get', KEYS[1]) == ARGV[1] then
  return redis.call('pexpire', KEYS[1], ARGV[2])
end
return 0
"""
_RELEASE = """
if redis.call('get', KEYS[1]) == ARGV[1] then
  return redis.call('del', KEYS[1])
end
return 0
"""


class RedisBuildLock:
    """:class:`app.store.locks.BuildLock` on one Redis.

    Args:
        url: the Redis URL (``REALIGN_REDIS_URL``).
        prefix: namespace of the lock keys.
    """

    def __init__(self, url: str, prefix: str = "realign:buildlock:") -> None:
        self.client: Any = redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=5)
        self.prefix = prefix
        self._renew = self.client.register_script(_RENEW)
        self._release = self.client.register_script(_RELEASE)

    def acquire(self, name: str, lease_s: float) -> int | None:
        token = int(self.client.incr(f"{self.prefix}fence"))
        ok = self.client.set(self.prefix + name, str(token), nx=True, px=int(lease_s * 1000))
        return token if ok else None

    def renew(self, name: str, token: int, lease_s: float) -> bool:
        return bool(self._renew(keys=[self.prefix + name], args=[str(token), int(lease_s * 1000)]))

    def release(self, name: str, token: int) -> None:
        self._release(keys=[self.prefix + name], args=[str(token)])


def build_lock(settings: Settings) -> RedisBuildLock | None:
    """The build lock every machine of the cluster shares (in its Redis), or None
    without ``REALIGN_REDIS_URL`` or without an object store (a local store's builders
    coordinate through its directory)."""
    if not settings.redis_url or not settings.store_url:
        return None
    return RedisBuildLock(settings.redis_url)


def cluster_store(settings: Settings, root: Path | None = None) -> Store:
    """The store ``settings`` configure, its builders sharing :func:`build_lock`
    (``root``: a local store directory instead, which needs no shared lock)."""
    return store_from_settings(settings, root, lock=None if root else build_lock(settings))
