"""Content hashes of input files, cached by file identity.

Hashing a 16 GB checkpoint takes seconds, so a digest is kept in a small SQLite
table keyed by (real path, device, inode, size, mtime); a file is hashed again
only when it changes — the way git's index and DVC avoid re-reading data.
"""

from __future__ import annotations

import hashlib
import os
import sqlite3
import threading
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from app.residuals.devices import usable_cpus

_BUF = 4 * 1024 * 1024


def sha256_file(path: Path) -> str:
    """sha256 of a file's bytes, read in large blocks (hashlib drops the GIL)."""
    digest = hashlib.sha256()
    buf = bytearray(_BUF)
    view = memoryview(buf)
    with path.open("rb", buffering=0) as fh:
        while n := fh.readinto(view):
            digest.update(view[:n])
    return digest.hexdigest()


class FileHasher:
    """sha256 of files with an optional persistent cache.

    Args:
        db_path: SQLite file for the cache; ``None`` hashes every time.
    """

    def __init__(self, db_path: Path | None = None) -> None:
        self.db_path = db_path
        self._lock = threading.Lock()
        if db_path is not None:
            db_path.parent.mkdir(parents=True, exist_ok=True)
            with self._connect() as db:
                db.execute(
                    "CREATE TABLE IF NOT EXISTS file_hashes (path TEXT PRIMARY KEY, dev INTEGER,"
                    " ino INTEGER, size INTEGER, mtime_ns INTEGER, sha256 TEXT)"
                )

    def _connect(self) -> sqlite3.Connection:
        assert self.db_path is not None
        return sqlite3.connect(self.db_path, timeout=30)

    def sha256(self, path: Path) -> str:
        """Return the sha256 of ``path``, from the cache when the file is unchanged."""
        real = os.path.realpath(path)
        st = os.stat(real)
        ident = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
        if self.db_path is not None:
            with self._lock, self._connect() as db:
                row = db.execute(
                    "SELECT dev, ino, size, mtime_ns, sha256 FROM file_hashes WHERE path = ?",
                    (real,),
                ).fetchone()
            if row is not None and tuple(row[:4]) == ident:
                return str(row[4])
        digest = sha256_file(Path(real))
        if self.db_path is not None:
            with self._lock, self._connect() as db:
                db.execute(
                    "INSERT OR REPLACE INTO file_hashes VALUES (?, ?, ?, ?, ?, ?)",
                    (real, *ident, digest),
                )
        return digest

    def sha256_many(self, paths: Iterable[Path]) -> dict[Path, str]:
        """Hash several files in parallel threads."""
        items = list(paths)
        workers = max(1, min(len(items), usable_cpus()))
        with ThreadPoolExecutor(workers) as pool:
            return dict(zip(items, pool.map(self.sha256, items), strict=True))
