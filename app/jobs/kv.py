"""The few key-value operations job records need, on Redis or on SQLite.

Redis backs the distributed service; the embedded default (no Redis configured)
keeps the same records in a SQLite file in the store, so a laptop run survives a
restart just the same. Both expose identical semantics (NX/EX sets, counters,
lists, sorted sets).
"""

from __future__ import annotations

import sqlite3
import threading
import time
from pathlib import Path
from typing import Any, Protocol


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
    def zadd(self, key: str, member: str, score: float) -> None: ...
    def zrevrange(self, key: str, start: int, stop: int) -> list[str]: ...
    def zrem(self, key: str, member: str) -> None: ...
    def scan(self, prefix: str) -> list[str]: ...
    def llen(self, key: str) -> int: ...


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

    def ping(self) -> bool:
        try:
            return bool(self.client.ping())
        except Exception:
            return False

    def get(self, key: str) -> str | None:
        return self.client.get(key)  # type: ignore[no-any-return]

    def mget(self, keys: list[str]) -> list[str | None]:
        return list(self.client.mget(keys)) if keys else []

    def set(self, key: str, value: str, *, nx: bool = False, ex: float | None = None) -> bool:
        px = int(ex * 1000) if ex is not None else None
        return bool(self.client.set(key, value, nx=nx, px=px))

    def delete(self, *keys: str) -> None:
        if keys:
            self.client.delete(*keys)

    def incr(self, key: str, by: int = 1) -> int:
        return int(self.client.incrby(key, by))

    def rpush(self, key: str, value: str) -> int:
        return int(self.client.rpush(key, value))

    def lrange(self, key: str, start: int, stop: int) -> list[str]:
        return list(self.client.lrange(key, start, stop))

    def ltrim(self, key: str, start: int, stop: int) -> None:
        self.client.ltrim(key, start, stop)

    def llen(self, key: str) -> int:
        return int(self.client.llen(key))

    def zadd(self, key: str, member: str, score: float) -> None:
        self.client.zadd(key, {member: score})

    def zrevrange(self, key: str, start: int, stop: int) -> list[str]:
        return list(self.client.zrevrange(key, start, stop))

    def zrem(self, key: str, member: str) -> None:
        self.client.zrem(key, member)

    def scan(self, prefix: str) -> list[str]:
        return sorted(self.client.scan_iter(match=f"{prefix}*", count=500))


_SCHEMA = """
CREATE TABLE IF NOT EXISTS kv (key TEXT PRIMARY KEY, value TEXT, expires REAL);
CREATE TABLE IF NOT EXISTS lists (key TEXT, idx INTEGER, value TEXT, PRIMARY KEY (key, idx));
CREATE TABLE IF NOT EXISTS zsets (key TEXT, member TEXT, score REAL, PRIMARY KEY (key, member));
"""


class SqliteKV:
    """KeyValue in one SQLite file (embedded mode; safe across threads and processes)."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, timeout=30, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.executescript(_SCHEMA)
        self._lock = threading.RLock()

    def _q(self, sql: str, *args: Any) -> list[Any]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    def ping(self) -> bool:
        return True

    def get(self, key: str) -> str | None:
        rows = self._q("SELECT value, expires FROM kv WHERE key = ?", key)
        if not rows or (rows[0][1] is not None and rows[0][1] < time.time()):
            return None
        return str(rows[0][0])

    def mget(self, keys: list[str]) -> list[str | None]:
        return [self.get(k) for k in keys]

    def set(self, key: str, value: str, *, nx: bool = False, ex: float | None = None) -> bool:
        expires = time.time() + ex if ex is not None else None
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                if nx and self.get(key) is not None:
                    return False
                self._db.execute(
                    "INSERT OR REPLACE INTO kv VALUES (?, ?, ?)", (key, value, expires)
                )
                return True
            finally:
                self._db.execute("COMMIT")

    def delete(self, *keys: str) -> None:
        with self._lock:
            for key in keys:
                for table in ("kv", "lists", "zsets"):
                    self._db.execute(f"DELETE FROM {table} WHERE key = ?", (key,))

    def incr(self, key: str, by: int = 1) -> int:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                value = int(self.get(key) or 0) + by
                self._db.execute("INSERT OR REPLACE INTO kv VALUES (?, ?, NULL)", (key, str(value)))
                return value
            finally:
                self._db.execute("COMMIT")

    def rpush(self, key: str, value: str) -> int:
        with self._lock:
            n = self.llen(key)
            top = self._q("SELECT COALESCE(MAX(idx), -1) FROM lists WHERE key = ?", key)[0][0]
            self._q("INSERT INTO lists VALUES (?, ?, ?)", key, int(top) + 1, value)
            return n + 1

    def llen(self, key: str) -> int:
        return int(self._q("SELECT COUNT(*) FROM lists WHERE key = ?", key)[0][0])

    def lrange(self, key: str, start: int, stop: int) -> list[str]:
        values = [r[0] for r in self._q("SELECT value FROM lists WHERE key = ? ORDER BY idx", key)]
        return values[start:] if stop == -1 else values[start : stop + 1]

    def ltrim(self, key: str, start: int, stop: int) -> None:
        with self._lock:
            keep = self.lrange(key, start, stop)
            self._q("DELETE FROM lists WHERE key = ?", key)
            for i, v in enumerate(keep):
                self._q("INSERT INTO lists VALUES (?, ?, ?)", key, i, v)

    def zadd(self, key: str, member: str, score: float) -> None:
        self._q("INSERT OR REPLACE INTO zsets VALUES (?, ?, ?)", key, member, score)

    def zrevrange(self, key: str, start: int, stop: int) -> list[str]:
        rows = self._q("SELECT member FROM zsets WHERE key = ? ORDER BY score DESC", key)
        values = [r[0] for r in rows]
        return values[start:] if stop == -1 else values[start : stop + 1]

    def zrem(self, key: str, member: str) -> None:
        self._q("DELETE FROM zsets WHERE key = ? AND member = ?", key, member)

    def scan(self, prefix: str) -> list[str]:
        now = time.time()
        rows = self._q(
            "SELECT key, expires FROM kv WHERE key LIKE ? ESCAPE '\\'",
            prefix.replace("%", "\\%").replace("_", "\\_") + "%",
        )
        return sorted(r[0] for r in rows if r[1] is None or r[1] >= now)
