"""Integrity on every read: files checked against their recorded checksum from the very
bytes a pipeline reads, while it reads them — no second pass over the data.

A file's recorded checksum is its XXH3-128 where the manifest has one (written by this
version: ~14 GB/s on one core, so the check costs a few percent of a merge), else its
sha256 (artifacts written before). Both catch any accidental change — a flipped bit, a
truncated copy; neither is a defence against someone who may rewrite the manifest too,
which carries its own seal in the same directory. sha256 stays the identity of a file
where one is needed (input models, safetensors outputs, object-store commit markers);
the ``.frames`` files of exact packs, read by Realign alone, record only the XXH3-128."""

from __future__ import annotations

import hashlib
import queue
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import xxhash

from app.core.errors import ArtifactCorruptError

_BUF = 4 * 1024 * 1024
_Item = tuple[Path, int, memoryview]
XXH3 = "xxh3_128:"  # prefix of an expected digest that is an XXH3-128, not a sha256


class _Digest(Protocol):
    def update(self, data: memoryview | bytes, /) -> None: ...
    def hexdigest(self) -> str: ...


def mismatch_message(label: str, name: str) -> str:
    """What every reader says about a file that does not match its recorded checksum."""
    return f"{label}: {name} does not match its recorded checksum — the file changed on disk"


def xxh3_hex(data: bytes | memoryview) -> str:
    """The XXH3-128 of ``data`` as recorded in manifests (hex, without the prefix)."""
    return xxhash.xxh3_128_hexdigest(data)


@dataclass
class _Track:
    size: int
    expected: str  # sha256 hex, or XXH3 + xxh3-128 hex
    digest: _Digest = field(init=False)
    pos: int = 0  # bytes [0, pos) are hashed
    broken: bool = False  # shorter than a read said it was

    def __post_init__(self) -> None:
        if self.expected.startswith(XXH3):
            self.digest = xxhash.xxh3_128()
            self.expected = self.expected.removeprefix(XXH3)
        else:
            self.digest = hashlib.sha256()


class ReadVerifier:
    """Checks files against their recorded checksums using the bytes a pipeline reads anyway.

    Every file is hashed in byte order: a read that starts where the hash stands is
    hashed from the caller's own view (no extra IO); bytes the pipeline skips (a
    shard's header) are read here; bytes read twice are hashed once. Views of a file
    mapping (``stable``) are hashed by a thread of this verifier, so the hash runs
    beside the pipeline instead of in its reader's path; a reused buffer is hashed at
    once. :meth:`finish` hashes whatever was never read and compares: call it before
    publishing anything derived from the files.

    Args:
        expected: (size, checksum) of each file to check, by path: a sha256 hex digest,
            or ``XXH3`` + an XXH3-128 hex digest (see ``FileEntry.checksum``).
        label: how errors name the artifact (its key or directory).
    """

    def __init__(self, expected: dict[Path, tuple[int, str]], label: str) -> None:
        self.label = label
        self._tracks = {Path(p): _Track(size, sha) for p, (size, sha) in expected.items()}
        self._lock = threading.Lock()
        self._hashed = threading.Condition(self._lock)
        self._queue: queue.Queue[_Item | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._closed = False

    def consume(self, file: Path, start: int, data: memoryview, *, stable: bool = False) -> None:
        """Account for ``data``, the bytes of ``file`` from offset ``start``.

        Args:
            stable: ``data`` stays valid and unchanged after the call (a view of a
                file mapping), so it may be hashed later, by the verifier's thread.
        """
        if file not in self._tracks or self._closed:
            return
        if data.format != "B" or data.ndim != 1:
            data = data.cast("B")
        if stable:
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="realign-verify", daemon=True
                )
                self._thread.start()
            self._queue.put((file, start, data))
            return
        self._queue.join()  # earlier views first: each file is hashed in byte order
        self._hash(file, start, data)

    def wait_hashed(self, file: Path, upto: int) -> None:
        """Block until bytes ``[0, upto)`` of ``file`` are hashed (or hashing stopped),
        so a caller may drop those pages: the lag, and the memory it holds, stay small."""
        track = self._tracks.get(file)
        if track is None:
            return
        with self._hashed:
            while track.pos < upto and not track.broken and self._busy():
                self._hashed.wait(0.05)

    def _busy(self) -> bool:
        return self._thread is not None and not self._closed and self._error is None

    def finish(self) -> None:
        """Hash the bytes nobody read and compare every file.

        Raises:
            ArtifactCorruptError: a file is missing, resized or altered.
        """
        self._drain()
        if self._error is not None:
            raise self._error
        with self._lock:
            for file, track in self._tracks.items():
                try:
                    size = file.stat().st_size
                    self._fill(file, track, size)
                except OSError:
                    size = -1
                if track.broken or size != track.size or track.digest.hexdigest() != track.expected:
                    raise ArtifactCorruptError(
                        mismatch_message(self.label, file.name), file=file.name
                    )

    def close(self) -> None:
        """Stop without a verdict (the reads were abandoned)."""
        self._closed = True
        self._drain()

    def _drain(self) -> None:
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()
            self._thread = None

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            try:
                if not self._closed and self._error is None:
                    self._hash(*item)
            except BaseException as exc:  # reported by finish()
                self._error = exc
            finally:
                self._queue.task_done()
        self._queue.task_done()

    def _hash(self, file: Path, start: int, data: memoryview) -> None:
        track = self._tracks[file]
        end = start + data.nbytes
        with self._lock:
            if end <= track.pos:
                return
            if start > track.pos and not self._fill(file, track, start):
                track.broken = True
                return
            view = data[track.pos - start :]
            for at in range(0, view.nbytes, _BUF):  # xxhash keeps the GIL: short holds
                track.digest.update(view[at : at + _BUF])
            track.pos = end
            self._hashed.notify_all()

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
