"""Streaming writer of sharded safetensors checkpoints.

Every tensor's shape and dtype is known before the first byte is computed, so
the shard layout and headers are planned up front and tensor bytes are appended
chunk by chunk as they are produced: no shard is ever assembled in memory.

Where the file system allows it, shards are written with ``O_DIRECT`` from an
aligned staging buffer: the bytes go from that buffer to the device with no
page-cache copy and no dirty-page build-up, so writing a model neither costs
CPU for the kernel's copy nor evicts the input models from the page cache.

A full disk (ENOSPC, EDQUOT, EFBIG), met by the IO thread or the final fsync,
raises ``InsufficientStorageError`` naming the shard and the bytes still to write.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import math
import mmap
import os
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Self

import xxhash

from app.core.errors import InsufficientStorageError
from app.residuals.dtypes import DType
from app.residuals.space import disk_full_error, is_disk_full


@dataclass(frozen=True)
class TensorSpec:
    """An output tensor: name, dtype and shape."""

    name: str
    dtype: DType
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


_ALIGN = 4096  # O_DIRECT needs block-aligned buffers, file offsets and lengths
STAGE_BYTES = 8 * 1024 * 1024


def _write_fully(fd: int, data: memoryview) -> None:
    while data.nbytes:
        n = os.write(fd, data)
        data = data[n:]


def _set_direct(fd: int, on: bool) -> bool:
    """Switch ``O_DIRECT`` on or off; False where the file system refuses it."""
    direct = getattr(os, "O_DIRECT", 0)
    if not direct:
        return False
    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    try:
        fcntl.fcntl(fd, fcntl.F_SETFL, flags | direct if on else flags & ~direct)
    except OSError:
        return False
    return on


class AppendFile:
    """An output file appended to sequentially, through ``O_DIRECT`` when possible.

    Bytes are staged in two aligned buffers: while one is written to the device by
    the IO thread, the caller fills the other, so copying and device time overlap.
    Only whole buffers are written that way; the last partial block is written with
    ``O_DIRECT`` switched off, then the file is fsynced.
    """

    def __init__(self, path: Path, stages: list[memoryview], io: ThreadPoolExecutor) -> None:
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        self._stages = stages
        self._cur = 0
        self._staged = 0
        self._io = io
        self._pending: Future[None] | None = None
        self._direct = _set_direct(self.fd, True)

    def write(self, data: memoryview) -> None:
        while data.nbytes:
            stage = self._stages[self._cur]
            n = min(data.nbytes, stage.nbytes - self._staged)
            stage[self._staged : self._staged + n] = data[:n]
            self._staged += n
            data = data[n:]
            if self._staged == stage.nbytes:
                self._wait()
                self._pending = self._io.submit(self._write_block, stage)
                self._cur ^= 1
                self._staged = 0

    def _wait(self) -> None:
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.result()

    def _write_block(self, block: memoryview) -> None:
        try:
            _write_fully(self.fd, block)
        except OSError as exc:
            if exc.errno != errno.EINVAL or not self._direct:
                raise
            # Accepted by fcntl, refused on write (some FUSE and network file systems).
            self._direct = _set_direct(self.fd, False)
            _write_fully(self.fd, block)

    def finish(self) -> int:
        """Write what is staged, fsync and close; return the file size."""
        self._wait()
        stage = self._stages[self._cur][: self._staged]
        whole = self._staged // _ALIGN * _ALIGN if self._direct else 0
        if whole:
            self._write_block(stage[:whole])
        self._direct = _set_direct(self.fd, False)
        _write_fully(self.fd, stage[whole:])
        os.fsync(self.fd)
        size = os.fstat(self.fd).st_size
        self.close()
        return size

    def close(self) -> None:
        if self.fd >= 0:
            with contextlib.suppress(Exception):
                self._wait()  # never close the fd under a write in flight
            os.close(self.fd)
            self.fd = -1


def plan_shards(
    specs: list[TensorSpec],
    max_shard_bytes: int,
    joined: Callable[[TensorSpec], bool] | None = None,
) -> list[list[TensorSpec]]:
    """Split tensors, in order, into shards of at most ``max_shard_bytes`` (a lone
    tensor larger than that gets a shard of its own); a tensor ``joined`` says True of
    stays in its predecessor's shard (the parts of one coded tensor, read together)."""
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for spec in specs:
        stays = joined is not None and joined(spec)
        if shards[-1] and size + spec.nbytes > max_shard_bytes and not stays:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += spec.nbytes
    return shards


def shard_files(prefix: str, n: int) -> list[str]:
    """File names of an ``n``-shard checkpoint (``prefix.safetensors`` when n == 1)."""
    if n == 1:
        return [f"{prefix}.safetensors"]
    return [f"{prefix}-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]


def write_index(
    directory: Path, prefix: str, files: list[str], shards: list[list[TensorSpec]]
) -> None:
    """Write ``prefix.safetensors.index.json`` for a checkpoint of several shards."""
    weight_map = {s.name: files[i] for i, shard in enumerate(shards) for s in shard}
    total = sum(s.nbytes for shard in shards for s in shard)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    path = directory / f"{prefix}.safetensors.index.json"
    path.write_text(json.dumps(index, indent=2) + "\n")


def _header(specs: list[TensorSpec], metadata: dict[str, str]) -> bytes:
    entries: dict[str, object] = {"__metadata__": metadata}
    offset = 0
    for spec in specs:
        end = offset + spec.nbytes
        entries[spec.name] = {
            "dtype": spec.dtype.code,
            "shape": list(spec.shape),
            "data_offsets": [offset, end],
        }
        offset = end
    raw = json.dumps(entries, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # data must start 8-byte aligned
    return len(raw).to_bytes(8, "little") + raw


class Closing:
    """A writer used as a context manager: ``close()`` on success, ``abort()`` on error
    (nothing half-written is left open)."""

    def close(self) -> None:
        raise NotImplementedError

    def abort(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        if et is None:
            self.close()
        else:
            self.abort()


class ShardedWriter(Closing):
    """Writes tensors in the planned order into ``prefix[-0000i-of-0000n].safetensors``.

    Args:
        directory: an existing, empty directory (normally a temp dir).
        specs: every tensor, in the order their bytes will arrive.
        prefix: file name stem, ``model`` for a transformers-loadable checkpoint.
        max_shard_bytes: largest shard.
        metadata: extra ``__metadata__`` entries (``format: pt`` is always set).
        hash_files: compute the sha256 and XXH3-128 of every file while writing.
        only: write just this shard (0-based) of the plan, with the name and header it
            has in the whole checkpoint, and no index: one worker's part of a merge
            split by output shard.
        joined: tensors that stay in their predecessor's shard (see :func:`plan_shards`).
    """

    def __init__(
        self,
        directory: Path,
        specs: list[TensorSpec],
        *,
        prefix: str = "model",
        max_shard_bytes: int = 5 * 1024**3,
        metadata: dict[str, str] | None = None,
        hash_files: bool = True,
        only: int | None = None,
        joined: Callable[[TensorSpec], bool] | None = None,
    ) -> None:
        self.directory = directory
        self.prefix = prefix
        self._shards = plan_shards(specs, max_shard_bytes, joined)
        self.files = shard_files(prefix, len(self._shards))
        self._metadata = {"format": "pt", **(metadata or {})}
        self._only = only
        self._order = [
            (i, s)
            for i, shard in enumerate(self._shards)
            if only is None or i == only
            for s in shard
        ]
        self._hash = hash_files
        self.sha256: dict[str, str] = {}
        self.xxh3: dict[str, str] = {}
        self.sizes: dict[str, int] = {}
        self._pos = 0  # index into _order of the tensor being written
        self._left = self._order[0][1].nbytes if self._order else 0
        self._file: AppendFile | None = None
        self._shard = -1
        self._hasher: hashlib._Hash | None = None
        self._xxh: xxhash.xxh3_128 | None = None
        self._stages: list[mmap.mmap] = []  # page-aligned, as O_DIRECT needs
        self._io: ThreadPoolExecutor | None = None

    @property
    def specs(self) -> list[TensorSpec]:
        return [s for _, s in self._order]

    def write(self, name: str, data: memoryview) -> None:
        """Append bytes of tensor ``name`` (which must be the one due next)."""
        if not data.nbytes:
            return
        while self._left == 0 and self._pos < len(self._order) and data.nbytes:
            self._advance()
        shard, spec = self._order[self._pos]
        if spec.name != name:
            raise RuntimeError(f"write order: expected {spec.name!r}, got {name!r}")
        if data.nbytes > self._left:
            raise RuntimeError(f"{name!r}: {data.nbytes} bytes exceed the {self._left} left")
        try:
            if shard != self._shard:
                self._open_shard(shard)
            self._write_all(data)
        except OSError as exc:
            error = self._disk_full(exc)
            if error is None:
                raise
            raise error from exc
        self._left -= data.nbytes

    def _disk_full(self, exc: OSError) -> InsufficientStorageError | None:
        """The typed error when ``exc`` is a full disk: the shard, the bytes left."""
        if not is_disk_full(exc):
            return None
        path = self.directory / self.files[max(self._shard, 0)]
        later = sum(s.nbytes for _, s in self._order[self._pos + 1 :])
        staged = self._file._staged if self._file is not None else 0
        return disk_full_error(path, exc, needed=self._left + later + staged or None)

    def _advance(self) -> None:
        self._pos += 1
        if self._pos < len(self._order):
            self._left = self._order[self._pos][1].nbytes

    def _open_shard(self, shard: int) -> None:
        self._finish_shard()
        self._shard = shard
        if self._io is None:
            self._stages = [mmap.mmap(-1, STAGE_BYTES) for _ in range(2)]
            self._io = ThreadPoolExecutor(1, thread_name_prefix="realign-io")
        stages = [memoryview(m) for m in self._stages]
        self._file = AppendFile(self.directory / self.files[shard], stages, self._io)
        self._hasher = hashlib.sha256() if self._hash else None
        self._xxh = xxhash.xxh3_128() if self._hash else None
        self._write_all(memoryview(_header(self._shards[shard], self._metadata)))

    def _write_all(self, data: memoryview) -> None:
        assert self._file is not None
        if self._hasher is not None and self._xxh is not None:
            self._hasher.update(data)
            self._xxh.update(data)
        if data.format != "B" or data.ndim != 1:
            data = data.cast("B")
        self._file.write(data)

    def _finish_shard(self) -> None:
        if self._file is None:
            return
        self.sizes[self.files[self._shard]] = self._file.finish()
        self._file = None
        if self._hasher is not None and self._xxh is not None:
            self.sha256[self.files[self._shard]] = self._hasher.hexdigest()
            self.xxh3[self.files[self._shard]] = self._xxh.hexdigest()

    def close(self) -> None:
        """Check every byte arrived, fsync the shards and write the index."""
        try:
            self._close()
        except BaseException as exc:
            error = self._disk_full(exc) if isinstance(exc, OSError) else None
            self.abort()  # never leave a shard's descriptor open
            if error is None:
                raise
            raise error from exc

    def _close(self) -> None:
        while self._pos < len(self._order) and self._left == 0:
            shard, _ = self._order[self._pos]
            if shard != self._shard:  # zero-byte tensors still need their shard's header
                self._open_shard(shard)
            self._advance()
        if self._pos < len(self._order):
            raise RuntimeError(f"tensor {self._order[self._pos][1].name!r} is incomplete")
        try:
            self._finish_shard()
        finally:
            self._stop_io()
        if len(self.files) > 1 and self._only is None:
            write_index(self.directory, self.prefix, self.files, self._shards)

    def abort(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        self._stop_io()

    def _stop_io(self) -> None:
        if self._io is not None:
            self._io.shutdown()
            self._io = None
