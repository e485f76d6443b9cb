"""The job records' KeyValue in one SQLite file (embedded mode).

Every compound operation runs in one ``BEGIN IMMEDIATE`` transaction, so it is
atomic across the threads of this process and across processes sharing the file.
SQLite errors (disk full, read-only file, locked too long) become
:class:`RecordsUnavailableError`: the API answers 503 and keeps serving reads.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from app.core.errors import RecordsUnavailableError
from app.jobs.kv import numbered

_SCHEMA = """
CREATE TABLE IF NOT EXISTS kv (key TEXT PRIMARY KEY, value TEXT, expires REAL);
CREATE TABLE IF NOT EXISTS lists (key TEXT, idx INTEGER, value TEXT, PRIMARY KEY (key, idx));
CREATE TABLE IF NOT EXISTS zsets (key TEXT, member TEXT, score REAL, PRIMARY KEY (key, member));
CREATE INDEX IF NOT EXISTS zsets_by_score ON zsets (key, score);
"""


class SqliteKV:
    """KeyValue in one SQLite file (safe across threads and processes)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        with self._errors("open"):
            self._db = sqlite3.connect(
                path, timeout=30, check_same_thread=False, isolation_level=None
            )
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.executescript(_SCHEMA)
        self._lock = threading.RLock()

    @contextlib.contextmanager
    def _errors(self, what: str) -> Iterator[None]:
        try:
            yield
        except sqlite3.Error as exc:
            raise RecordsUnavailableError(
                f"job records in {self.path}: cannot {what} ({exc}); if the disk is "
                "full, free space there, then retry"
            ) from exc

    @contextlib.contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock, self._errors("write"):
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
                self._db.execute("COMMIT")
            except BaseException:
                if self._db.in_transaction:  # a failed COMMIT (disk full) leaves it open
                    with contextlib.suppress(sqlite3.Error):
                        self._db.execute("ROLLBACK")
                raise

    def _q(self, sql: str, *args: Any) -> list[Any]:
        with self._lock, self._errors("read"):
            return self._db.execute(sql, args).fetchall()

    def ping(self) -> bool:
        try:
            self._q("SELECT 1")
            return True
        except RecordsUnavailableError:
            return False

    def get(self, key: str) -> str | None:
        rows = self._q("SELECT value, expires FROM kv WHERE key = ?", key)
        if not rows or (rows[0][1] is not None and rows[0][1] < time.time()):
            return None
        return str(rows[0][0])

    def mget(self, keys: list[str]) -> list[str | None]:
        return [self.get(k) for k in keys]

    def set(self, key: str, value: str, *, nx: bool = False, ex: float | None = None) -> bool:
        expires = time.time() + ex if ex is not None else None
        with self._tx() as db:
            if nx and self.get(key) is not None:
                return False
            db.execute("INSERT OR REPLACE INTO kv VALUES (?, ?, ?)", (key, value, expires))
            return True

    def delete(self, *keys: str) -> None:
        with self._tx() as db:
            for key in keys:
                for table in ("kv", "lists", "zsets"):
                    db.execute(f"DELETE FROM {table} WHERE key = ?", (key,))

    def incr(self, key: str, by: int = 1) -> int:
        with self._tx() as db:
            value = int(self.get(key) or 0) + by
            db.execute("INSERT OR REPLACE INTO kv VALUES (?, ?, NULL)", (key, str(value)))
            return value

    def _push(self, db: sqlite3.Connection, key: str, make: Any) -> int:
        top = db.execute("SELECT MAX(idx), COUNT(*) FROM lists WHERE key = ?", (key,)).fetchone()
        idx, n = (-1 if top[0] is None else int(top[0])) + 1, int(top[1]) + 1
        db.execute("INSERT INTO lists VALUES (?, ?, ?)", (key, idx, make(n)))
        return n

    def rpush(self, key: str, value: str) -> int:
        with self._tx() as db:
            return self._push(db, key, lambda n: value)

    def append_numbered(self, key: str, obj: str) -> int:
        with self._tx() as db:
            return self._push(db, key, lambda n: numbered(obj, n))

    def llen(self, key: str) -> int:
        return int(self._q("SELECT COUNT(*) FROM lists WHERE key = ?", key)[0][0])

    def lrange(self, key: str, start: int, stop: int) -> list[str]:
        if start >= 0 and stop == -1:  # the common case (events after n): no full read
            sql = "SELECT value FROM lists WHERE key = ? ORDER BY idx LIMIT -1 OFFSET ?"
            return [r[0] for r in self._q(sql, key, start)]
        values = [r[0] for r in self._q("SELECT value FROM lists WHERE key = ? ORDER BY idx", key)]
        return values[start:] if stop == -1 else values[start : stop + 1]

    def ltrim(self, key: str, start: int, stop: int) -> None:
        with self._tx() as db:
            keep = self.lrange(key, start, stop)
            db.execute("DELETE FROM lists WHERE key = ?", (key,))
            db.executemany(
                "INSERT INTO lists VALUES (?, ?, ?)", [(key, i, v) for i, v in enumerate(keep)]
            )

    def zadd(self, key: str, member: str, score: float) -> None:
        with self._tx() as db:
            db.execute("INSERT OR REPLACE INTO zsets VALUES (?, ?, ?)", (key, member, score))

    def zrevrange(self, key: str, start: int, stop: int) -> list[str]:
        limit = -1 if stop == -1 else max(0, stop - start + 1)
        sql = "SELECT member FROM zsets WHERE key = ? ORDER BY score DESC LIMIT ? OFFSET ?"
        return [r[0] for r in self._q(sql, key, limit, start)]

    def zrange_upto(self, key: str, max_score: float, limit: int) -> list[str]:
        sql = "SELECT member FROM zsets WHERE key = ? AND score <= ? ORDER BY score LIMIT ?"
        return [r[0] for r in self._q(sql, key, max_score, limit)]

    def zrange_after(
        self, key: str, max_score: float, after: tuple[float, str] | None, limit: int
    ) -> list[tuple[str, float]]:
        if after is None:
            sql = (
                "SELECT member, score FROM zsets WHERE key = ? AND score <= ? "
                "ORDER BY score, member LIMIT ?"
            )
            rows = self._q(sql, key, max_score, limit)
        else:
            score, member = after
            sql = (
                "SELECT member, score FROM zsets WHERE key = ? AND score <= ? AND "
                "(score > ? OR (score = ? AND member > ?)) ORDER BY score, member LIMIT ?"
            )
            rows = self._q(sql, key, max_score, score, score, member, limit)
        return [(str(r[0]), float(r[1])) for r in rows]

    def zcard(self, key: str) -> int:
        return int(self._q("SELECT COUNT(*) FROM zsets WHERE key = ?", key)[0][0])

    def zrem(self, key: str, member: str) -> None:
        with self._tx() as db:
            db.execute("DELETE FROM zsets WHERE key = ? AND member = ?", (key, member))

    def scan(self, prefix: str) -> list[str]:
        now = time.time()
        rows = self._q(
            "SELECT key, expires FROM kv WHERE key LIKE ? ESCAPE '\\'",
            prefix.replace("%", "\\%").replace("_", "\\_") + "%",
        )
        return sorted(r[0] for r in rows if r[1] is None or r[1] >= now)

    def take(self, key: str) -> list[str]:
        with self._tx() as db:
            rows = db.execute("SELECT value FROM lists WHERE key = ? ORDER BY idx", (key,))
            values = [r[0] for r in rows.fetchall()]
            db.execute("DELETE FROM lists WHERE key = ?", (key,))
            return values

    def acquire(self, key: str, holder: str, ttl: float) -> bool:
        with self._tx() as db:
            current = self.get(key)
            if current is not None and current != holder:
                return False
            expires = time.time() + ttl
            db.execute("INSERT OR REPLACE INTO kv VALUES (?, ?, ?)", (key, holder, expires))
            return True

    def release(self, key: str, holder: str) -> bool:
        with self._tx() as db:
            if self.get(key) != holder:
                return False
            db.execute("DELETE FROM kv WHERE key = ?", (key,))
            return True

    def write(
        self, sets: dict[str, str], member: str, add: dict[str, float], remove: Sequence[str]
    ) -> None:
        with self._tx() as db:
            self._write(db, sets, member, add, remove)

    def put_unless(
        self,
        key: str,
        value: str,
        refused: Sequence[str],
        member: str,
        add: dict[str, float],
        remove: Sequence[str],
    ) -> bool:
        with self._tx() as db:  # BEGIN IMMEDIATE: no writer between the read and the write
            current = self.get(key)
            if current is not None:
                try:
                    doc = json.loads(current)
                except ValueError:
                    doc = None
                if isinstance(doc, dict) and doc.get("status") in refused:
                    return False
            self._write(db, {key: value}, member, add, remove)
            return True

    @staticmethod
    def _write(
        db: sqlite3.Connection,
        sets: dict[str, str],
        member: str,
        add: dict[str, float],
        remove: Sequence[str],
    ) -> None:
        db.executemany("INSERT OR REPLACE INTO kv VALUES (?, ?, NULL)", list(sets.items()))
        db.executemany(
            "DELETE FROM zsets WHERE key = ? AND member = ?", [(k, member) for k in remove]
        )
        rows = [(k, member, score) for k, score in add.items()]
        db.executemany("INSERT OR REPLACE INTO zsets VALUES (?, ?, ?)", rows)
