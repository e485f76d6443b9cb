"""Per-caller request limits: a sliding-window rate and a cap on requests in flight.

Two backends with one interface: :class:`RedisLimiter` when ``redis_url`` is set (so
every API process shares the counts; each check is one atomic Lua script) and
:class:`MemoryLimiter` in the embedded mode. The rate is a sliding window over two
fixed one-minute counters (the previous minute weighted by how much of it is still
inside the window), so a burst at a minute's boundary cannot double the limit.
Concurrency slots in Redis live in a sorted set scored by expiry: a running request
refreshes its slot, and a crashed process's slots expire on their own.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from typing import Any, Protocol

log = logging.getLogger("app.api")
WINDOW_S = 60.0

_RATE = """
local prev = tonumber(redis.call('GET', KEYS[1]) or '0')
local cur = tonumber(redis.call('GET', KEYS[2]) or '0')
if prev * tonumber(ARGV[2]) + cur + 1 > tonumber(ARGV[1]) then
  return {0, prev, cur}
end
cur = redis.call('INCR', KEYS[2])
if cur == 1 then redis.call('EXPIRE', KEYS[2], ARGV[3]) end
return {1, prev, cur}
"""
_ACQUIRE = """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[3]) then return 0 end
redis.call('ZADD', KEYS[1], ARGV[2], ARGV[4])
redis.call('PEXPIRE', KEYS[1], ARGV[5])
return 1
"""
_REFRESH = """
redis.call('ZADD', KEYS[1], 'XX', ARGV[1], ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return 1
"""


def retry_after(prev: int, cur: int, rpm: int, elapsed: float) -> int:
    """Whole seconds until one more request fits in the sliding window."""
    if cur + 1 > rpm:  # this minute alone is full: wait for the next one to decay it
        into_next = WINDOW_S * (1 - (rpm - 1) / cur) if cur else 0.0
        wait = WINDOW_S - elapsed + into_next
    else:  # the previous minute's weight must decay
        wait = WINDOW_S * (1 - (rpm - cur - 1) / prev) - elapsed if prev else 0.0
    return max(1, math.ceil(wait))


def _window(now: float) -> tuple[int, float]:
    index = int(now // WINDOW_S)
    return index, now - index * WINDOW_S


class Limiter(Protocol):
    """Counts requests per ``(bucket, ident)``; ``ident`` is an API key name or an address."""

    refresh_every: float | None  # how often an in-flight slot must be refreshed, if at all

    async def hit(self, bucket: str, ident: str, rpm: int) -> int | None:
        """Count one request; None if it fits, else the seconds to wait."""
        ...

    async def acquire(self, bucket: str, ident: str, limit: int, token: str) -> bool:
        """Take one of ``limit`` concurrency slots; False when all are taken."""
        ...

    async def refresh(self, bucket: str, ident: str, token: str) -> None: ...

    async def release(self, bucket: str, ident: str, token: str) -> None: ...

    async def close(self) -> None: ...


class MemoryLimiter:
    """In-process counts, for the embedded mode (one API process)."""

    refresh_every: float | None = None

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._rates: dict[tuple[str, str], tuple[int, int, int]] = {}  # index, prev, cur
        self._slots: dict[tuple[str, str], set[str]] = {}

    async def hit(self, bucket: str, ident: str, rpm: int) -> int | None:
        index, elapsed = _window(time.time())
        with self._lock:
            last, prev, cur = self._rates.get((bucket, ident), (index, 0, 0))
            if last != index:  # roll the window forward
                prev, cur = (cur if last == index - 1 else 0), 0
            if prev * (1 - elapsed / WINDOW_S) + cur + 1 > rpm:
                self._rates[(bucket, ident)] = (index, prev, cur)
                return retry_after(prev, cur, rpm, elapsed)
            self._rates[(bucket, ident)] = (index, prev, cur + 1)
            if len(self._rates) > 100_000:  # forget callers idle for two windows
                stale = [k for k, v in self._rates.items() if v[0] < index - 1]
                for k in stale:
                    del self._rates[k]
        return None

    async def acquire(self, bucket: str, ident: str, limit: int, token: str) -> bool:
        with self._lock:
            held = self._slots.setdefault((bucket, ident), set())
            if len(held) >= limit:
                return False
            held.add(token)
            return True

    async def refresh(self, bucket: str, ident: str, token: str) -> None:
        return None

    async def release(self, bucket: str, ident: str, token: str) -> None:
        with self._lock:
            held = self._slots.get((bucket, ident))
            if held is not None:
                held.discard(token)
                if not held:
                    del self._slots[(bucket, ident)]

    async def close(self) -> None:
        return None

    def forget(self) -> None:
        """Drop every count and held slot (a fresh start: every caller's window opens now)."""
        with self._lock:
            self._rates.clear()
            self._slots.clear()


class RedisLimiter:
    """Counts shared by every API process through Redis.

    Args:
        url: the Redis URL (``Settings.redis_url``).
        slot_ttl_s: a concurrency slot not refreshed for this long is free again.
        prefix: key prefix.
    """

    def __init__(self, url: str, slot_ttl_s: float = 60.0, prefix: str = "realign:limit") -> None:
        self.url = url
        self.slot_ttl_s = slot_ttl_s
        self.refresh_every: float | None = slot_ttl_s / 3
        self.prefix = prefix
        self._client: Any = None

    def _redis(self) -> Any:
        if self._client is None:  # created on first use, inside the serving event loop
            import redis.asyncio

            self._client = redis.asyncio.Redis.from_url(
                self.url, decode_responses=True, socket_timeout=5, socket_connect_timeout=5
            )
        return self._client

    def _key(self, bucket: str, ident: str, kind: str) -> str:
        return f"{self.prefix}:{{{bucket}:{ident}}}:{kind}"  # one hash slot per caller

    async def hit(self, bucket: str, ident: str, rpm: int) -> int | None:
        index, elapsed = _window(time.time())
        keys = [self._key(bucket, ident, f"rate:{i}") for i in (index - 1, index)]
        weight = 1 - elapsed / WINDOW_S
        ok, prev, cur = await self._redis().eval(_RATE, 2, *keys, rpm, weight, int(2 * WINDOW_S))
        return None if ok else retry_after(int(prev), int(cur), rpm, elapsed)

    async def acquire(self, bucket: str, ident: str, limit: int, token: str) -> bool:
        now = time.time()
        key = self._key(bucket, ident, "slots")
        ttl_ms = int(self.slot_ttl_s * 1000)
        args = (now, now + self.slot_ttl_s, limit, token, ttl_ms)
        return bool(await self._redis().eval(_ACQUIRE, 1, key, *args))

    async def refresh(self, bucket: str, ident: str, token: str) -> None:
        key = self._key(bucket, ident, "slots")
        expires = time.time() + self.slot_ttl_s
        await self._redis().eval(_REFRESH, 1, key, expires, token, int(self.slot_ttl_s * 1000))

    async def release(self, bucket: str, ident: str, token: str) -> None:
        await self._redis().zrem(self._key(bucket, ident, "slots"), token)

    async def close(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None
