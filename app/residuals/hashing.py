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
from dataclasses import dataclass, field
from pathlib import Path

from app.core.errors import ArtifactCorruptError

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
        workers = max(1, min(len(items), os.cpu_count() or 1))
        with ThreadPoolExecutor(workers) as pool:
            return dict(zip(items, pool.map(self.sha256, items), strict=True))


def mismatch_message(label: str, name: str) -> str:
    """What every reader says about a file that does not match its recorded sha256."""
    return f"{label}: {name} does not match its recorded sha256 — the file changed on disk"


@dataclass
class _Track:
    size: int
    sha256: str
    digest: hashlib._Hash = field(default_factory=hashlib.sha256)
    pos: int = 0  # bytes [0, pos) are hashed
    broken: bool = False  # shorter than a read said it was


class ReadVerifier:
    """Checks files against their recorded sha256 using the bytes a pipeline reads anyway.

    Every file is hashed in byte order: a read that starts where the hash stands is
    hashed from the caller's own view (no extra IO); bytes the pipeline skips (a
    shard's header) are read here; bytes read twice are hashed once. :meth:`finish`
    hashes whatever was never read and compares. Call it before publishing anything
    derived from the files.

    Args:
        expected: (size, sha256) of each file to check, by path.
        label: how errors name the artifact (its key or directory).
    """

    def __init__(self, expected: dict[Path, tuple[int, str]], label: str) -> None:
        self.label = label
        self._tracks = {Path(p): _Track(size, sha) for p, (size, sha) in expected.items()}
        self._lock = threading.Lock()

    def consume(self, file: Path, start: int, data: memoryview) -> None:
        """Account for ``data``, the bytes of ``file`` from offset ``start``."""
        track = self._tracks.get(file)
        end = start + data.nbytes
        if track is None or end <= track.pos:
            return
        if data.format != "B" or data.ndim != 1:
            data = data.cast("B")
        with self._lock:
            if start > track.pos and not self._fill(file, track, start):
                track.broken = True
                return
            track.digest.update(data[track.pos - start :])
            track.pos = end

    def finish(self) -> None:
        """Hash the bytes nobody read and compare every file.

        Raises:
            ArtifactCorruptError: a file is missing, resized or altered.
        """
        with self._lock:
            for file, track in self._tracks.items():
                try:
                    size = file.stat().st_size
                    self._fill(file, track, size)
                except OSError:
                    size = -1
                if track.broken or size != track.size or track.digest.hexdigest() != track.sha256:
                    raise ArtifactCorruptError(
                        mismatch_message(self.label, file.name), file=file.name
                    )

    @staticmethod
    def _fill(file: Path, track: _Track, upto: int) -> bool:
        """Hash ``file`` from where its hash stands up to ``upto``; False at a short file."""
        if track.pos >= upto:
            return True
        with file.open("rb", buffering=0) as fh:
            fh.seek(track.pos)
            while track.pos < upto:
                chunk = fh.read(min(_BUF, upto - track.pos))
                if not chunk:
                    return False
                track.digest.update(chunk)
                track.pos += len(chunk)
        return True
