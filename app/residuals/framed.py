"""Exact residual packs on disk: ``residual-NNNNN.frames`` files and their index.

:class:`app.residuals.framewriter.FramedWriter` writes them: each residual tensor's
``(p, neg)`` cut into frames (:mod:`app.residuals.frames`), appended in order;
``residual.frames.json`` maps each tensor to its file and frame offsets.

:class:`FramedPack` reads such a pack as a :class:`Checkpoint` holding, for each residual
tensor ``name``, two tensors: ``name`` (``p``) and ``name::neg``, so every reader of packs
plans with them as with any checkpoint; frames are decoded as rows are asked for, read
through the pack's read verifier (each file checked against its recorded checksum).
"""

from __future__ import annotations

import ctypes
import json
import math
import os
import threading
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from app.core.errors import ArtifactCorruptError, CorruptCheckpointError
from app.residuals import native
from app.residuals.checkpoint import Checkpoint, TensorInfo
from app.residuals.devices import usable_cpus
from app.residuals.dtypes import DTYPES, DType
from app.residuals.frames import FRAME_ELEMS, FrameError, decode_frame
from app.residuals.integrity import mismatch_message

FRAMES_INDEX = "residual.frames.json"
FRAMES_FORMAT = "realign.frames/3"
"""Written by this version: /2 brought nibble-coded planes, /3 corrections by byte plane;
packs of /1 (zstd only) and /2 read too."""
_READABLE = ("realign.frames/1", "realign.frames/2", FRAMES_FORMAT)
NEG = "::neg"
"""Suffix of the correction tensor of each residual tensor in a :class:`FramedPack`."""


def frame_file(i: int) -> str:
    return f"residual-{i + 1:05d}.frames"


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
        if index.get("format") not in _READABLE or index["frame_elems"] != FRAME_ELEMS:
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
    # decoded frames: (p, neg), a half None where it was decoded straight into a reader's
    # buffer; the buffers of evicted frames are reused (no allocation, no page faults)
    _cache: OrderedDict[tuple[str, int], list[bytearray | None]] = field(
        default_factory=OrderedDict, repr=False
    )
    _free: list[bytearray] = field(default_factory=list, repr=False)
    _raw: bytearray = field(default_factory=bytearray, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _decoders: ThreadPoolExecutor | None = field(default=None, repr=False)

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
        if out.nbytes < (hi - lo) * f.itemsize:  # the copies below are not bounds-checked
            raise ValueError(f"{info.name}: {out.nbytes} bytes for {hi - lo} elements")
        at = 0
        with self._lock:
            first, end = lo // FRAME_ELEMS, -(-hi // FRAME_ELEMS)
            for batch in range(first, end, _BATCH):
                parts = []
                for k in range(batch, min(end, batch + _BATCH)):
                    start = k * FRAME_ELEMS
                    a, b = max(lo, start) - start, min(hi, start + FRAME_ELEMS) - start
                    parts.append((k, a, b, out[at : at + (b - a) * f.itemsize]))
                    at += (b - a) * f.itemsize
                self._read_frames(f, int(neg), parts)

    def _read_frames(self, f: _Framed, half: int, parts: list[_Part]) -> None:
        """Elements ``[a, b)`` of frame ``k``, of ``p`` (``half`` 0) or ``neg`` (1), into
        ``dest`` for each part; the caller holds the lock.

        A frame's wanted half comes from the cache where it is there, else its frame is
        decoded: a frame read whole straight into ``dest``, the rest into reused buffers;
        the half not asked for is kept, as ``neg`` is read right after ``p``. The frames
        to decode are read in one call in file order (as the read verifier hashes them);
        decoding and copying run side by side on the pack's threads (zstd, the kernel and
        ctypes' memmove drop the GIL): decoding is most of an exact apply's reading."""
        todo = [k for k, *_ in parts if self._cached(f, k, half) is None]
        raw = self._read_raw(f, todo) if todo else (memoryview(b""), 0)
        fresh: dict[int, list[bytearray | None]] = {}  # the frames decoded: their buffers
        tasks = [self._task(f, half, part, raw, fresh) for part in parts]
        try:
            self._run(tasks)
        except BaseException as exc:
            for halves in fresh.values():
                self._release(halves)
            if isinstance(exc, FrameError):
                if self.verifier is not None:  # a damaged file: say so as every reader does
                    self.verifier.finish()
                raise self._damaged(f, str(exc)) from exc
            raise
        for k, halves in fresh.items():
            self._release(self._cache.pop((f.name, k), None))
            self._cache[(f.name, k)] = halves
        while len(self._cache) > _CACHED_FRAMES:
            self._release(self._cache.popitem(last=False)[1])

    def _run(self, tasks: list[Callable[[], None]]) -> None:
        """Run a batch's tasks on the pack's threads; return (or raise the first task's
        error) only when none of them runs any more, so that their buffers may be reused
        whatever interrupts the wait (a time limit's exception in this thread)."""
        if len(tasks) == 1:
            tasks[0]()
            return
        futures: list[Future[None]] = []
        try:
            for task in tasks:
                futures.append(self._pool().submit(task))
            wait(futures)
        finally:  # also when interrupted: nothing started may still run after this
            for future in futures:
                future.cancel()
            wait(futures)
        for future in futures:
            future.result()

    def _task(
        self,
        f: _Framed,
        half: int,
        part: _Part,
        raw: tuple[memoryview, int],
        fresh: dict[int, list[bytearray | None]],
    ) -> Callable[[], None]:
        """What brings one part: a copy from the cache, or the decoding of its frame (its
        new cache entry, with the buffers it takes, goes to ``fresh``)."""
        k, a, b, dest = part
        size = f.itemsize
        hit = self._cached(f, k, half)
        if hit is not None:
            return partial(_copy_out, dest, hit, a * size)
        n = min(FRAME_ELEMS, f.elems - k * FRAME_ELEMS)
        whole = a == 0 and b == n
        halves = [None if whole and h == half else self._take() for h in range(2)]
        fresh[k] = halves
        outs = [dest if h is None else memoryview(h)[: n * size] for h in halves]
        view, start = raw
        frame = view[f.offsets[k] - start : f.offsets[k + 1] - start]
        kept = halves[half]
        then = None if kept is None else partial(_copy_out, dest, kept, a * size)
        return partial(_decode_one, f, k, frame, n, outs, then)

    def _take(self) -> bytearray:
        return self._free.pop() if self._free else bytearray(FRAME_ELEMS * 4)

    def _cached(self, f: _Framed, k: int, half: int) -> bytearray | None:
        entry = self._cache.get((f.name, k))
        if entry is None or entry[half] is None:
            return None
        self._cache.move_to_end((f.name, k))  # newest: not evicted by this read's frames
        return entry[half]

    def _release(self, entry: list[bytearray | None] | None) -> None:
        self._free.extend(b for b in entry or () if b is not None)

    def _read_raw(self, f: _Framed, ks: list[int]) -> tuple[memoryview, int]:
        """The stored bytes of frames ``ks[0]`` to ``ks[-1]`` of ``f``, and their offset."""
        start, end = f.offsets[ks[0]], f.offsets[ks[-1] + 1]
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
        return view, start

    def _pool(self) -> ThreadPoolExecutor:
        if self._decoders is None:
            workers = min(_BATCH, usable_cpus())
            self._decoders = ThreadPoolExecutor(workers, thread_name_prefix="realign-decode")
        return self._decoders

    def _damaged(self, f: _Framed, what: str) -> ArtifactCorruptError:
        return ArtifactCorruptError(
            f"{mismatch_message(self.label or str(self.path), f.file.name)} ({what})",
            file=f.file.name,
        )

    def close(self) -> None:
        with self._lock:  # after a read in progress, not under it
            if self._decoders is not None:
                self._decoders.shutdown(wait=True)
                self._decoders = None
            self._cache.clear()
            self._free.clear()
        super().close()


_Part = tuple[int, int, int, memoryview]  # frame, first and end element, where they go


def _copy_out(dest: memoryview, src: bytearray, offset: int) -> None:
    if dest.nbytes:
        ctypes.memmove(
            native.address(dest, writable=True), native.address(src) + offset, dest.nbytes
        )


def _decode_one(
    f: _Framed,
    k: int,
    frame: memoryview,
    n: int,
    outs: list[memoryview],
    then: Callable[[], None] | None,
) -> None:
    try:
        decode_frame(frame, n, f.itemsize, outs[0], outs[1])
    except FrameError as exc:
        raise FrameError(f"frame {k} of {f.name!r}: {exc}") from None
    if then is not None:
        then()


_BATCH = 8  # frames decoded side by side: a chunk's (8M elements = 8 frames)
_CACHED_FRAMES = 12  # a batch and its neighbours (the cache must hold a whole batch)
