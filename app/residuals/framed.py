"""Exact residual packs on disk: ``residual-NNNNN.frames`` files and their index.

:class:`FramedWriter` takes each residual tensor's ``(p, neg)`` chunks in order (from the
streaming pipeline), cuts them into frames (:mod:`app.residuals.frames`), encodes frames on
a small thread pool and appends them, in order, to the current file, hashing every byte
written. ``residual.frames.json`` maps each tensor to its file and frame offsets.

:class:`FramedPack` reads such a pack as a :class:`Checkpoint` holding, for each residual
tensor ``name``, two tensors: ``name`` (``p``) and ``name::neg``, so every reader of packs
plans with them as with any checkpoint; frames are decoded as rows are asked for, read
through the pack's read verifier (each file checked against its recorded checksum).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import xxhash

from app.core.errors import ArtifactCorruptError, CorruptCheckpointError
from app.residuals.checkpoint import Checkpoint, TensorInfo
from app.residuals.dtypes import DTYPES, DType
from app.residuals.frames import (
    FRAME_ELEMS,
    FrameError,
    decode_frame,
    encode_frame,
    worth_coding,
)
from app.residuals.integrity import mismatch_message
from app.residuals.shards import Closing, TensorSpec
from app.residuals.space import disk_full_error, is_disk_full

FRAMES_INDEX = "residual.frames.json"
FRAMES_FORMAT = "realign.frames/1"
NEG = "::neg"
"""Suffix of the correction tensor of each residual tensor in a :class:`FramedPack`."""
_THREADS = 8  # at most this many frames encoded at once, one per core (zstd releases the GIL)


def frame_file(i: int) -> str:
    return f"residual-{i + 1:05d}.frames"


class FramedWriter(Closing):
    """Writes the tensors of an exact pack, in the order of ``specs``, into ``directory``.

    Args:
        directory: an existing, empty directory.
        specs: every residual tensor (``p``'s dtype and shape), in arrival order.
        max_file_bytes: a new file starts at the first tensor after this many bytes.
        hash_files: record sha256 and XXH3-128 of every file while writing.
    """

    def __init__(
        self,
        directory: Path,
        specs: list[TensorSpec],
        *,
        max_file_bytes: int = 5 * 1024**3,
        hash_files: bool = True,
    ) -> None:
        self.directory = directory
        self._specs = specs
        self._max = max_file_bytes
        self._hash = hash_files
        self.files: list[str] = []
        self.sha256: dict[str, str] = {}
        self.xxh3: dict[str, str] = {}
        self.sizes: dict[str, int] = {}
        self.nonzero: dict[str, int] = {}
        self._index: dict[str, dict[str, Any]] = {}
        self._pos = -1
        self._left = 0
        self._frame_p = bytearray()
        self._frame_n = bytearray()
        self._has_neg = False
        self._fh: BinaryIO | None = None
        self._size = 0
        self._sha: Any = None
        self._xxh: Any = None
        self._pool = ThreadPoolExecutor(
            min(_THREADS, os.cpu_count() or 1), thread_name_prefix="realign-encode"
        )
        self._planes: dict[str, tuple[bool, ...]] = {}  # per tensor: planes worth coding
        self._advance()

    def _spec(self) -> TensorSpec:
        return self._specs[self._pos]

    def _advance(self) -> None:
        while self._pos + 1 < len(self._specs):
            self._pos += 1
            spec = self._spec()
            self._left = spec.nbytes
            if self._fh is None or self._size >= self._max:
                self._open_file()
            self._index[spec.name] = {
                "file": self.files[-1],
                "dtype": spec.dtype.code,
                "shape": list(spec.shape),
                "frames": [] if spec.nbytes else [self._size],
            }
            self.nonzero[spec.name] = 0
            if self._left:
                return
        self._left = 0

    def write(self, name: str, data: memoryview) -> None:
        """Append ``p`` bytes of tensor ``name`` whose corrections are all zero (rows an
        instruct model added, copied as they are)."""
        self.write_pair(name, data, None)

    def write_pair(self, name: str, p: memoryview, neg: memoryview | None) -> None:
        """Append the next bytes of tensor ``name``'s ``p`` and ``neg`` (None: zeros)."""
        p = p.cast("B") if p.format != "B" or p.ndim != 1 else p
        if neg is not None and (neg.format != "B" or neg.ndim != 1):
            neg = neg.cast("B")
        if neg is not None and neg.nbytes != p.nbytes:
            raise ValueError(f"{name!r}: {neg.nbytes} bytes of corrections for {p.nbytes} of p")
        if not p.nbytes:
            return
        spec = self._spec() if self._pos < len(self._specs) else None
        if spec is None or spec.name != name:
            want = spec.name if spec else "nothing"
            raise RuntimeError(f"write order: expected {want!r}, got {name!r}")
        if p.nbytes > self._left:
            raise RuntimeError(f"{name!r}: {p.nbytes} bytes exceed the {self._left} left")
        frame_bytes = FRAME_ELEMS * spec.dtype.itemsize
        frames: list[tuple[memoryview, memoryview | None]] = []
        at = 0
        while at < p.nbytes:
            if not self._frame_p and p.nbytes - at >= frame_bytes:  # a whole frame: no copy
                end = at + frame_bytes
                frames.append((p[at:end], neg[at:end] if neg is not None else None))
                self._left -= frame_bytes
                at = end
                continue
            take = min(p.nbytes - at, frame_bytes - len(self._frame_p))
            self._frame_p += p[at : at + take]
            self._frame_n += neg[at : at + take] if neg is not None else bytes(take)
            self._has_neg |= neg is not None
            at += take
            self._left -= take
            if len(self._frame_p) == frame_bytes or self._left == 0:
                carried = bytes(self._frame_n) if self._has_neg else None
                frames.append((memoryview(bytes(self._frame_p)), _view(carried)))
                self._frame_p, self._frame_n, self._has_neg = bytearray(), bytearray(), False
        self._encode(name, spec.dtype.itemsize, frames)
        if self._left == 0:
            self._advance()

    def _encode(
        self, name: str, itemsize: int, frames: list[tuple[memoryview, memoryview | None]]
    ) -> None:
        """Encode ``frames`` (on the pool, the first of a tensor here: it decides which
        planes are worth coding) and append them in order, before the caller's buffers
        are reused."""
        if not frames:
            return
        if name not in self._planes:
            p, neg = frames.pop(0)
            frame, count = encode_frame(p, neg, itemsize)
            self._planes[name] = worth_coding(frame, p.nbytes // itemsize, itemsize)
            self._add(name, frame, count)
        planes = self._planes[name]
        futures = [self._pool.submit(encode_frame, p, n, itemsize, planes) for p, n in frames]
        try:
            for future in futures:
                self._add(name, *future.result())
        finally:
            for future in futures:
                future.cancel()

    def _add(self, name: str, frame: bytes, count: int) -> None:
        offsets = self._index[name]["frames"]
        if not offsets:
            offsets.append(self._size)
        self._append(frame)
        offsets.append(self._size)
        self.nonzero[name] += count

    def _append(self, data: bytes) -> None:
        assert self._fh is not None
        try:
            self._fh.write(data)
        except OSError as exc:
            raise self._full(exc) from exc
        if self._sha is not None:
            self._sha.update(data)
            self._xxh.update(data)
        self._size += len(data)

    def _full(self, exc: OSError) -> BaseException:
        if not is_disk_full(exc):
            return exc
        return disk_full_error(self.directory / self.files[-1], exc, needed=None)

    def _open_file(self) -> None:
        self._finish_file()
        name = frame_file(len(self.files))
        self.files.append(name)
        self._fh = (self.directory / name).open("wb")
        self._size = 0
        self._sha = hashlib.sha256() if self._hash else None
        self._xxh = xxhash.xxh3_128() if self._hash else None

    def _finish_file(self) -> None:
        if self._fh is None:
            return
        try:
            self._fh.flush()
            os.fsync(self._fh.fileno())
        except OSError as exc:
            raise self._full(exc) from exc
        finally:
            self._fh.close()
            self._fh = None
        name = self.files[-1]
        self.sizes[name] = self._size
        if self._sha is not None:
            self.sha256[name] = self._sha.hexdigest()
            self.xxh3[name] = self._xxh.hexdigest()

    def close(self) -> None:
        """Check every byte arrived, write out the last frames, fsync, write the index."""
        try:
            if self._left or self._pos + 1 < len(self._specs):
                raise RuntimeError(f"tensor {self._spec().name!r} is incomplete")
            self._finish_file()
        except BaseException:
            self.abort()
            raise
        self._pool.shutdown()
        for name, entry in self._index.items():
            entry["nonzero"] = self.nonzero.get(name, 0)
        index = {"format": FRAMES_FORMAT, "frame_elems": FRAME_ELEMS, "tensors": self._index}
        (self.directory / FRAMES_INDEX).write_text(json.dumps(index, indent=1) + "\n")

    def abort(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        if self._fh is not None:
            self._fh.close()
            self._fh = None


def _view(data: bytes | None) -> memoryview | None:
    return memoryview(data) if data is not None else None


@dataclass(frozen=True)
class _Framed:
    """One residual tensor of a framed pack: where its frames lie."""

    name: str
    file: Path
    dtype: DType
    shape: tuple[int, ...]
    offsets: tuple[int, ...]  # frame k is bytes [offsets[k], offsets[k + 1]) of ``file``

    @property
    def itemsize(self) -> int:
        return self.dtype.itemsize

    @property
    def elems(self) -> int:
        return math.prod(self.shape)


def _read_index(pack_dir: Path) -> dict[str, _Framed]:
    path = pack_dir / FRAMES_INDEX
    try:
        index = json.loads(path.read_text())
        if index.get("format") != FRAMES_FORMAT or index["frame_elems"] != FRAME_ELEMS:
            raise ValueError(f"format {index.get('format')!r}, {index.get('frame_elems')} elems")
        out = {}
        for name, e in index["tensors"].items():
            dtype = DTYPES[e["dtype"]]
            elems = math.prod(e["shape"])
            offsets = tuple(int(o) for o in e["frames"])
            if len(offsets) != -(-elems // FRAME_ELEMS) + 1:
                raise ValueError(f"{name}: {len(offsets) - 1} frames for {elems} elements")
            out[name] = _Framed(name, pack_dir / e["file"], dtype, tuple(e["shape"]), offsets)
        return out
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CorruptCheckpointError(
            f"{path}: not a readable frames index ({exc.__class__.__name__}: {exc})"
        ) from exc


def _infos(pack_dir: Path, framed: dict[str, _Framed]) -> list[TensorInfo]:
    infos = []
    for name, f in framed.items():
        for logical in (name, name + NEG):
            infos.append(TensorInfo(logical, f.file, f.dtype, f.shape, 0, f.elems * f.itemsize))
    return infos


@dataclass
class FramedPack(Checkpoint):
    """An exact pack read as a checkpoint of ``name`` / ``name::neg`` tensors (see module).

    ``map_rows`` gives None (frames are decoded, never mapped); ``read_into`` decodes the
    frames a row range covers, keeping the last few decoded so that reading ``name`` then
    ``name::neg`` of the same rows decodes once.
    """

    label: str = ""
    _framed: dict[str, _Framed] = field(default_factory=dict, repr=False)
    _cache: OrderedDict[tuple[str, int], tuple[bytearray, bytearray]] = field(
        default_factory=OrderedDict, repr=False
    )
    _free: list[tuple[bytearray, bytearray]] = field(default_factory=list, repr=False)
    _raw: bytearray = field(default_factory=bytearray, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @classmethod
    def open_framed(
        cls, pack_dir: Path, config: dict[str, Any], label: str, verifier: Any
    ) -> FramedPack:
        framed = _read_index(pack_dir)
        tensors = {i.name: i for i in _infos(pack_dir, framed)}
        pack = cls(pack_dir, config, tensors, verifier=verifier, label=label)
        pack._framed = framed
        return pack

    def map_rows(self, info: TensorInfo, row0: int, row1: int) -> memoryview | None:
        return None

    def release_rows(self, info: TensorInfo, row0: int, row1: int) -> None:
        return None

    def read_into(self, info: TensorInfo, row0: int, row1: int, out: memoryview) -> None:
        neg = info.name.endswith(NEG)
        f = self._framed[info.name[: -len(NEG)] if neg else info.name]
        row_elems = f.elems // info.rows if info.rows else 0
        lo, hi = row0 * row_elems, row1 * row_elems
        out = out.cast("B") if out.format != "B" or out.ndim != 1 else out
        at = 0
        with self._lock:
            for k in range(lo // FRAME_ELEMS, -(-hi // FRAME_ELEMS)):
                start = k * FRAME_ELEMS
                p, n = self._frame(f, k)
                data = n if neg else p
                a, b = max(lo, start) - start, min(hi, start + FRAME_ELEMS) - start
                size = (b - a) * f.itemsize
                out[at : at + size] = memoryview(data)[a * f.itemsize : b * f.itemsize]
                at += size

    def _frame(self, f: _Framed, k: int) -> tuple[bytearray, bytearray]:
        """Frame ``k`` of ``f`` decoded (from the cache when there); the caller holds the
        lock (buffers of evicted frames are reused: no allocation, no page faults, per
        frame)."""
        key = (f.name, k)
        hit = self._cache.get(key)
        if hit is not None:
            self._cache.move_to_end(key)
            return hit
        n = min(FRAME_ELEMS, f.elems - k * FRAME_ELEMS)
        start, end = f.offsets[k], f.offsets[k + 1]
        if len(self._raw) < end - start:
            self._raw = bytearray(end - start)
        view = memoryview(self._raw)[: end - start]
        fd = self._fd(f.file)
        got = 0
        while got < view.nbytes:
            r = os.preadv(fd, [view[got:]], start + got)
            if r == 0:
                raise self._damaged(f, "the file ends inside a frame")
            got += r
        if self.verifier is not None:
            self.verifier.consume(f.file, start, view)
        size = FRAME_ELEMS * 4
        p, neg = self._free.pop() if self._free else (bytearray(size), bytearray(size))
        try:
            decode_frame(
                view,
                n,
                f.itemsize,
                memoryview(p)[: n * f.itemsize],
                memoryview(neg)[: n * f.itemsize],
            )
        except FrameError as exc:
            self._free.append((p, neg))
            if self.verifier is not None:  # a damaged file: say so as every reader does
                self.verifier.finish()
            raise self._damaged(f, f"frame {k} of {f.name!r}: {exc}") from exc
        self._cache[key] = (p, neg)
        while len(self._cache) > _CACHED_FRAMES:
            self._free.append(self._cache.popitem(last=False)[1])
        return p, neg

    def _damaged(self, f: _Framed, what: str) -> ArtifactCorruptError:
        return ArtifactCorruptError(
            f"{mismatch_message(self.label or str(self.path), f.file.name)} ({what})",
            file=f.file.name,
        )

    def close(self) -> None:
        self._cache.clear()
        self._free.clear()
        super().close()


_CACHED_FRAMES = 12  # a chunk's frames (8M elements = 8 frames) and its neighbours
