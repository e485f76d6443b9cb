"""The few key-value operations job records need, on Redis or on SQLite.

Redis backs the distributed service; the embedded default (no Redis configured)
keeps the same records in a SQLite file in the store (:mod:`app.jobs.sqlite_kv`),
so a laptop run survives a restart just the same. Both expose identical semantics
(NX/EX sets, counters, lists, sorted sets) and the same atomic compound operations
(numbered appends, compare-and-set leases, index moves): Lua scripts on Redis, one
transaction on SQLite. A backend that cannot serve a call (down, disk full) raises
:class:`RecordsUnavailableError`, which the API answers with a 503.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any, ParamSpec, Protocol, TypeVar

from app.core.errors import RecordsUnavailableError

_P = ParamSpec("_P")
_T = TypeVar("_T")


class KeyValue(Protocol):
    def ping(self) -> bool: ...
    def get(self, key: str) -> str | None: ...
    def mget(self, keys: list[str]) -> list[str | None]: ...
    def set(self, key: str, value: str, *, nx: bool = False, ex: float | None = None) -> bool: ...
    def delete(self, *keys: str) -> None: ...
    def incr(self, key: str, by: int = 1) -> int: ...
    def rpush(self, key: str, value: str) -> int: ...
    def lrange(self, key: str, start: int, stop: int) -> list[str]: ...
    def ltrim(self, key: str, start: int, stop: int) -> None: ...
    def llen(self, key: str) -> int: ...
    def zadd(self, key: str, member: str, score: float) -> None: ...
    def zrevrange(self, key: str, start: int, stop: int) -> list[str]: ...
    def zrange_upto(self, key: str, max_score: float, limit: int) -> list[str]: ...
    def zrange_after(
        self, key: str, max_score: float, after: tuple[float, str] | None, limit: int
    ) -> list[tuple[str, float]]:
        """Up to ``limit`` (member, score) of sorted set ``key`` in (score, member)
        order, each after the cursor ``after`` (a (score, member) already seen; None:
        from the start) with a score up to ``max_score``: a page of a walk that reads
        ``limit`` entries at a time."""
        ...

    def zcard(self, key: str) -> int: ...
    def zrem(self, key: str, member: str) -> None: ...
    def scan(self, prefix: str) -> list[str]: ...

    def append_numbered(self, key: str, obj: str) -> int:
        """Append the JSON object ``obj`` to list ``key`` as ``{"seq": n, ...}`` where n
        is its 1-based position, atomically; return n."""
        ...

    def take(self, key: str) -> list[str]:
        """Remove and return every element of list ``key``, atomically."""
        ...

    def acquire(self, key: str, holder: str, ttl: float) -> bool:
        """Set ``key`` to ``holder`` for ``ttl`` s if it is free or already ``holder``'s."""
        ...

    def release(self, key: str, holder: str) -> bool:
        """Delete ``key`` only if ``holder`` holds it."""
        ...

    def write(
        self, sets: dict[str, str], member: str, add: dict[str, float], remove: Sequence[str]
    ) -> None:
        """In one transaction: set ``sets``, add ``member`` to the ``add`` sorted sets
        (with their scores), remove it from the ``remove`` ones."""
        ...

    def put_unless(
        self,
        key: str,
        value: str,
        refused: Sequence[str],
        member: str,
        add: dict[str, float],
        remove: Sequence[str],
    ) -> bool:
        """Like :meth:`write` of ``{key: value}``, but only if the JSON object stored at
        ``key`` has no ``status`` among ``refused`` (compare-and-set); False if refused."""
        ...


def numbered(obj: str, seq: int) -> str:
    """``obj`` (a JSON object) with ``"seq": seq`` as its first member."""
    rest = obj.strip()[1:]
    return '{"seq":' + str(seq) + ("," + rest if rest.strip() != "}" else "}")


_APPEND = """
local n = redis.call('LLEN', KEYS[1]) + 1
local rest = string.sub(ARGV[1], 2)
if rest == '}' then
  redis.call('RPUSH', KEYS[1], '{"seq":' .. n .. '}')
else
  redis.call('RPUSH', KEYS[1], '{"seq":' .. n .. ',' .. rest)
end
return n
"""
_ACQUIRE = """
local cur = redis.call('GET', KEYS[1])
if cur == false or cur == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
return 0
"""
# KEYS: the record, the index sets to leave, the index sets to join.
# ARGV: value, member, n refused, refused..., n to leave, scores of the sets to join...
_PUT_UNLESS = """
local cur = redis.call('GET', KEYS[1])
local n = tonumber(ARGV[3])
if cur then
  local ok, doc = pcall(cjson.decode, cur)
  if ok and type(doc) == 'table' then
    for i = 1, n do
      if doc['status'] == ARGV[3 + i] then return 0 end
    end
  end
end
redis.call('SET', KEYS[1], ARGV[1])
local leave = tonumber(ARGV[4 + n])
for i = 1, leave do redis.call('ZREM', KEYS[1 + i], ARGV[2]) end
for i = 2 + leave, #KEYS do
  redis.call('ZADD', KEYS[i], ARGV[5 + n + i - 2 - leave], ARGV[2])
end
return 1
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('DEL', KEYS[1])
  return 1
end
return 0
"""


def _why(exc: BaseException) -> str:
    """A cause for an operator, without the client's internals (class names, addresses)."""
    import redis.exceptions as rex

    return "timed out" if isinstance(exc, rex.TimeoutError) else "no answer"


def _guarded(fn: Callable[_P, _T]) -> Callable[_P, _T]:
    """Turn the client's connection and server errors into RecordsUnavailableError."""

    @functools.wraps(fn)
    def call(*args: _P.args, **kwargs: _P.kwargs) -> _T:
        import redis.exceptions as rex

        try:
            return fn(*args, **kwargs)
        except (rex.ConnectionError, rex.TimeoutError) as exc:
            raise RecordsUnavailableError(
                f"job records: Redis is not reachable ({_why(exc)}); "
                "check REALIGN_REDIS_URL and the Redis server, then retry"
            ) from exc
        except rex.ResponseError as exc:  # MISCONF (cannot persist), OOM, READONLY replica
            first = str(exc).split(".")[0][:160]
            raise RecordsUnavailableError(
                f"job records: Redis refused the write ({first}); check the Redis "
                "server's disk and memory, then retry"
            ) from exc

    return call


class RedisKV:
    """KeyValue on a Redis server (redis-py, decoded strings)."""

    def __init__(self, url: str) -> None:
        import redis

        self.client: Any = redis.Redis.from_url(
            url,
            decode_responses=True,
            socket_timeout=5,
            socket_connect_timeout=5,
            health_check_interval=30,
        )
        self._append = self.client.register_script(_APPEND)
        self._acquire = self.client.register_script(_ACQUIRE)
        self._release = self.client.register_script(_RELEASE)
        self._put_unless = self.client.register_script(_PUT_UNLESS)

    def ping(self) -> bool:
        try:
            return bool(self.client.ping())
        except Exception:
            return False

    @_guarded
    def get(self, key: str) -> str | None:
        return self.client.get(key)  # type: ignore[no-any-return]

    @_guarded
    def mget(self, keys: list[str]) -> list[str | None]:
        return list(self.client.mget(keys)) if keys else []

    @_guarded
    def set(self, key: str, value: str, *, nx: bool = False, ex: float | None = None) -> bool:
        px = int(ex * 1000) if ex is not None else None
        return bool(self.client.set(key, value, nx=nx, px=px))

    @_guarded
    def delete(self, *keys: str) -> None:
        if keys:
            self.client.delete(*keys)

    @_guarded
    def incr(self, key: str, by: int = 1) -> int:
        return int(self.client.incrby(key, by))

    @_guarded
    def rpush(self, key: str, value: str) -> int:
        return int(self.client.rpush(key, value))

    @_guarded
    def lrange(self, key: str, start: int, stop: int) -> list[str]:
        return list(self.client.lrange(key, start, stop))

    @_guarded
    def ltrim(self, key: str, start: int, stop: int) -> None:
        self.client.ltrim(key, start, stop)

    @_guarded
    def llen(self, key: str) -> int:
        return int(self.client.llen(key))

    @_guarded
    def zadd(self, key: str, member: str, score: float) -> None:
        self.client.zadd(key, {member: score})

    @_guarded
    def zrevrange(self, key: str, start: int, stop: int) -> list[str]:
        return list(self.client.zrevrange(key, start, stop))

    @_guarded
    def zrange_upto(self, key: str, max_score: float, limit: int) -> list[str]:
        return list(self.client.zrangebyscore(key, "-inf", max_score, start=0, num=limit))

    @_guarded
    def zrange_after(
        self, key: str, max_score: float, after: tuple[float, str] | None, limit: int
    ) -> list[tuple[str, float]]:
        if after is None:
            rows = self.client.zrangebyscore(
                key, "-inf", max_score, start=0, num=limit, withscores=True
            )
            return [(m, float(s)) for m, s in rows]
        score, member = after
        seen = (score, member.encode())  # Redis orders equal scores by the members' bytes
        offset = 0
        while True:  # from the cursor's score on; entries of that score seen before skipped
            rows = self.client.zrangebyscore(
                key, score, max_score, start=offset, num=limit, withscores=True
            )
            fresh = [(m, float(s)) for m, s in rows if (float(s), m.encode()) > seen]
            if fresh or len(rows) < limit:
                return fresh
            offset += limit  # a whole page of ties at the cursor's score, all seen

    @_guarded
    def zcard(self, key: str) -> int:
        return int(self.client.zcard(key))

    @_guarded
    def zrem(self, key: str, member: str) -> None:
        self.client.zrem(key, member)

    @_guarded
    def scan(self, prefix: str) -> list[str]:
        return sorted(self.client.scan_iter(match=f"{prefix}*", count=500))

    @_guarded
    def append_numbered(self, key: str, obj: str) -> int:
        return int(self._append(keys=[key], args=[obj]))

    @_guarded
    def take(self, key: str) -> list[str]:
        pipe = self.client.pipeline(transaction=True)
        pipe.lrange(key, 0, -1)
        pipe.delete(key)
        return list(pipe.execute()[0])

    @_guarded
    def acquire(self, key: str, holder: str, ttl: float) -> bool:
        return bool(self._acquire(keys=[key], args=[holder, max(1, int(ttl * 1000))]))

    @_guarded
    def release(self, key: str, holder: str) -> bool:
        return bool(self._release(keys=[key], args=[holder]))

    @_guarded
    def write(
        self, sets: dict[str, str], member: str, add: dict[str, float], remove: Sequence[str]
    ) -> None:
        pipe = self.client.pipeline(transaction=True)  # MULTI/EXEC
        for key, value in sets.items():
            pipe.set(key, value)
        for key in remove:
            pipe.zrem(key, member)
        for key, score in add.items():
            pipe.zadd(key, {member: score})
        pipe.execute()

    @_guarded
    def put_unless(
        self,
        key: str,
        value: str,
        refused: Sequence[str],
        member: str,
        add: dict[str, float],
        remove: Sequence[str],
    ) -> bool:
        keys = [key, *remove, *add]
        args: list[str | int | float] = [value, member, len(refused), *refused]
        args += [len(remove), *add.values()]
        return bool(self._put_unless(keys=keys, args=args))
