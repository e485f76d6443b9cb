"""Writing exact packs: ``residual-NNNNN.frames`` files and their index (read by
:class:`app.residuals.framed.FramedPack`).

:class:`FramedWriter` takes each residual tensor's ``(p, neg)`` chunks in order, cuts them
into frames (:mod:`app.residuals.frames`) and passes each frame through three stages that
overlap, so that the next chunk is computed while earlier frames are coded and written:

1. the caller lays the frame out (byte planes, sparse corrections) into one of a few
   reusable frame buffers: its own buffers are free again when the call returns, and it
   waits only while every frame buffer is in use;
2. a thread pool codes the frame (nibbles in C, zstd; both release the GIL);
3. an appender thread takes the coded frames in order, hashes them (XXH3-128) and appends
   them to the current file through ``O_DIRECT`` where the file system
   allows it (no page-cache copy), then hands the frame buffer back.
"""

from __future__ import annotations

import json
import mmap
import queue
import threading
from concurrent.futures import Future, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any

import xxhash

from app.residuals.devices import usable_cpus
from app.residuals.framed import FRAMES_FORMAT, FRAMES_INDEX, frame_file
from app.residuals.frames import (
    FRAME_ELEMS,
    Coding,
    FrameBuffers,
    Laid,
    code_frame,
    lay_out,
    worth_coding,
)
from app.residuals.shards import STAGE_BYTES, AppendFile, Closing, TensorSpec
from app.residuals.space import disk_full_error, is_disk_full

_THREADS = 8  # at most this many frames coded at once, one per core
Pieces = list[bytes | memoryview]
_Frame = tuple[str, "Future[Pieces]", FrameBuffers, int]  # tensor, coding, buffers, count


def _code_first(laid: Laid, planes: Future[tuple[Coding, ...]]) -> Pieces:
    """Code the first frame of a tensor, trying every plane, and say from it how its later
    frames should code each plane (only that answer is kept: not the frame's bytes)."""
    try:
        pieces = code_frame(laid)
        planes.set_result(worth_coding(pieces, laid.n, laid.itemsize))
    except BaseException as exc:
        planes.set_exception(exc)
        raise
    return pieces


def _code_later(laid: Laid, planes: Future[tuple[Coding, ...]]) -> Pieces:
    return code_frame(laid, planes.result())


def submit_first(
    pool: ThreadPoolExecutor, laid: Laid, planes: Future[tuple[Coding, ...]]
) -> Future[Pieces]:
    """Have a tensor's first frame coded on ``pool``; ``planes`` gets its answer. A first
    frame cancelled before it ran (an abort, a full disk) cancels ``planes`` too: a later
    frame a pool thread has already taken would otherwise wait on it for ever."""
    future = pool.submit(_code_first, laid, planes)
    future.add_done_callback(lambda f: planes.cancel() if f.cancelled() else None)
    return future


class FramedWriter(Closing):
    """Writes the tensors of an exact pack, in the order of ``specs``, into ``directory``.

    Args:
        directory: an existing, empty directory.
        specs: every residual tensor (``p``'s dtype and shape), in arrival order.
        max_file_bytes: a new file starts at the first tensor after this many bytes.
        hash_files: record the XXH3-128 of every file while writing: the checksum that
            every read verifies. No sha256: only Realign reads these files, and a sha256
            would cost a core-second per 1.7 GB on the writer's one serial stage; the
            object store takes the sha256 of each file it uploads for its commit marker.
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
        self.sha256: dict[str, str] = {}  # stays empty (see hash_files)
        self.xxh3: dict[str, str] = {}
        self.sizes: dict[str, int] = {}
        self.nonzero: dict[str, int] = {}
        self._index: dict[str, dict[str, Any]] = {}
        # The caller's side: which tensor is due, the frame it is filling.
        self._pos = -1
        self._left = 0
        self._carry = (mmap.mmap(-1, FRAME_ELEMS * 4), mmap.mmap(-1, FRAME_ELEMS * 4))
        self._filled = 0
        self._has_neg = False
        self._planes: dict[str, Future[tuple[Coding, ...]]] = {}  # per tensor: plane codings
        threads = min(_THREADS, usable_cpus())
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="realign-encode")
        self._free: queue.Queue[FrameBuffers] = queue.Queue()
        for _ in range(2 * threads + 2):
            self._free.put(FrameBuffers())
        self._todo: queue.Queue[TensorSpec | _Frame | None] = queue.Queue()
        self._error: BaseException | None = None
        self._dropping = False
        # The appender's side: the file being written, its size and checksum.
        self._file: AppendFile | None = None
        self._size = 0
        self._xxh: Any = None
        self._io: ThreadPoolExecutor | None = None
        self._stages: list[mmap.mmap] = []
        self._appender = threading.Thread(
            target=self._append_all, name="realign-append", daemon=True
        )
        self._appender.start()
        self._advance()

    def _spec(self) -> TensorSpec:
        return self._specs[self._pos]

    def _advance(self) -> None:
        while self._pos + 1 < len(self._specs):
            self._pos += 1
            spec = self._spec()
            self._left = spec.nbytes
            self._todo.put(spec)  # the appender starts its index entry, in order
            if self._left:
                return
        self._left = 0

    def write(self, name: str, data: memoryview) -> None:
        """Append ``p`` bytes of tensor ``name`` whose corrections are all zero (rows an
        instruct model added, copied as they are)."""
        self.write_pair(name, data, None)

    def write_pair(self, name: str, p: memoryview, neg: memoryview | None) -> None:
        """Append the next bytes of tensor ``name``'s ``p`` and ``neg`` (None: zeros).

        Raises:
            InsufficientStorageError: an earlier frame met a full disk.
            RuntimeError: bytes out of order or beyond the tensor.
        """
        if self._error is not None:
            raise self._error
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
        at = 0
        while at < p.nbytes:
            if not self._filled and p.nbytes - at >= frame_bytes:  # a whole frame: no copy
                end = at + frame_bytes
                self._submit(spec, p[at:end], neg[at:end] if neg is not None else None)
                self._left -= frame_bytes
                at = end
                continue
            take = min(p.nbytes - at, frame_bytes - self._filled)
            self._fill(p[at : at + take], neg[at : at + take] if neg is not None else None)
            at += take
            self._left -= take
            if self._filled == frame_bytes or self._left == 0:
                cp, cn = (memoryview(m)[: self._filled] for m in self._carry)
                self._submit(spec, cp, cn if self._has_neg else None)
                self._filled, self._has_neg = 0, False
        if self._left == 0:
            self._planes.pop(name, None)
            self._advance()

    def _fill(self, p: memoryview, neg: memoryview | None) -> None:
        """Add bytes to the frame being filled (a frame that spans chunks)."""
        lo, hi = self._filled, self._filled + p.nbytes
        cp, cn = self._carry
        cp[lo:hi] = p
        if neg is not None:
            cn[lo:hi] = neg
        elif self._has_neg:
            cn[lo:hi] = bytes(hi - lo)
        if neg is not None and not self._has_neg and lo:
            cn[:lo] = bytes(lo)  # the frame's earlier bytes had no corrections
        self._has_neg |= neg is not None
        self._filled = hi

    def _submit(self, spec: TensorSpec, p: memoryview, neg: memoryview | None) -> None:
        """Lay one frame out (here: the caller's buffers are then free), have it coded on
        the pool, and queue it for the appender."""
        buf = self._take_buffer()
        try:
            laid = lay_out(p, neg, spec.dtype.itemsize, buf)
            planes = self._planes.get(spec.name)
            if planes is None:
                planes = self._planes[spec.name] = Future()
                future = submit_first(self._pool, laid, planes)
            else:
                future = self._pool.submit(_code_later, laid, planes)
        except BaseException:
            self._free.put(buf)
            raise
        self._todo.put((spec.name, future, buf, laid.count))

    def _take_buffer(self) -> FrameBuffers:
        while True:
            if self._error is not None:
                raise self._error
            if not self._appender.is_alive():  # gone without a word: never wait on it
                raise RuntimeError("the exact pack's appender thread stopped unexpectedly")
            try:
                return self._free.get(timeout=0.1)
            except queue.Empty:
                continue

    # ---- the appender thread ----------------------------------------------------------

    def _append_all(self) -> None:
        """Take frames in order; after an error (or an abort) only hand buffers back."""
        while (item := self._todo.get()) is not None:
            try:
                if isinstance(item, TensorSpec):
                    if self._error is None:
                        self._begin(item)
                    continue
                name, future, buf, count = item
                try:
                    if self._error is None and not self._dropping:
                        self._append_frame(name, future.result(), count)
                finally:
                    if not future.cancel():
                        wait([future])  # the pool may still read the buffers
                    self._free.put(buf)
            except BaseException as exc:
                if self._error is None:
                    err = self._full(exc) if isinstance(exc, OSError) else exc
                    if err is not exc:
                        err.__cause__ = exc
                    self._error = err

    def _begin(self, spec: TensorSpec) -> None:
        if self._file is None or self._size >= self._max:
            self._open_file()
        self._index[spec.name] = {
            "file": self.files[-1],
            "dtype": spec.dtype.code,
            "shape": list(spec.shape),
            "frames": [] if spec.nbytes else [self._size],
        }
        self.nonzero[spec.name] = 0

    def _append_frame(self, name: str, pieces: Pieces, count: int) -> None:
        assert self._file is not None
        offsets = self._index[name]["frames"]
        if not offsets:
            offsets.append(self._size)
        for piece in pieces:
            view = memoryview(piece)
            if self._xxh is not None:
                self._xxh.update(view)
            self._file.write(view)
            self._size += view.nbytes
        offsets.append(self._size)
        self.nonzero[name] += count

    def _open_file(self) -> None:
        self._finish_file()
        name = frame_file(len(self.files))
        self.files.append(name)
        if self._io is None:
            self._stages = [mmap.mmap(-1, STAGE_BYTES) for _ in range(2)]
            self._io = ThreadPoolExecutor(1, thread_name_prefix="realign-io")
        stages = [memoryview(m) for m in self._stages]
        self._file = AppendFile(self.directory / name, stages, self._io)
        self._size = 0
        self._xxh = xxhash.xxh3_128() if self._hash else None

    def _finish_file(self) -> None:
        if self._file is None:
            return
        file, self._file = self._file, None
        try:
            size = file.finish()
        finally:
            file.close()
        name = self.files[-1]
        self.sizes[name] = size
        if self._xxh is not None:
            self.xxh3[name] = self._xxh.hexdigest()

    def _full(self, exc: OSError) -> BaseException:
        if not is_disk_full(exc) or not self.files:
            return exc
        return disk_full_error(self.directory / self.files[-1], exc, needed=None)

    # ---- the end ----------------------------------------------------------------------

    def _stop_appender(self) -> None:
        if self._appender.is_alive():
            self._todo.put(None)
            self._appender.join()

    def close(self) -> None:
        """Check every byte arrived, write out the last frames, fsync, write the index."""
        try:
            if self._left or self._pos + 1 < len(self._specs):
                raise RuntimeError(f"tensor {self._spec().name!r} is incomplete")
            self._stop_appender()
            if self._error is not None:
                raise self._error
            try:
                self._finish_file()
            except OSError as exc:
                raise self._full(exc) from exc
        except BaseException:
            self.abort()
            raise
        self._shutdown()
        for name, entry in self._index.items():
            entry["nonzero"] = self.nonzero.get(name, 0)
        index = {"format": FRAMES_FORMAT, "frame_elems": FRAME_ELEMS, "tensors": self._index}
        (self.directory / FRAMES_INDEX).write_text(json.dumps(index, indent=1) + "\n")

    def abort(self) -> None:
        self._dropping = True
        self._stop_appender()
        if self._file is not None:
            self._file.close()
            self._file = None
        self._shutdown()

    def _shutdown(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        if self._io is not None:
            self._io.shutdown()
            self._io = None
