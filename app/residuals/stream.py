"""The streaming tensor pipeline shared by compute, apply and fused merge.

Three stages overlap: a reader thread fills chunk buffers from the input files,
the calling thread runs the math backend, a writer thread appends the result to the
output shards. A fixed pool of buffers flows through them, so peak memory is a
few chunks whatever the model size.
"""

from __future__ import annotations

import math
import queue
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import cast

from app.core.errors import OperationCancelledError
from app.residuals.devices import MathBackend
from app.residuals.methods import MergeMethod
from app.residuals.progress import CancelFlag, Progress, ProgressCallback
from app.residuals.steps import Done, Operand, Pending, Prior, Stats, Step
from app.residuals.tensorjobs import PairWriter, Source, TensorJob, TensorStats, TensorWriter

CHUNK_ELEMS = 8 * 1024 * 1024
_SLOTS = 3  # chunks in flight: read, computed, written (at least 2: see _next)
_NOTHING = Done([])


@dataclass(frozen=True)
class _Chunk:
    job: int
    row0: int
    row1: int
    combine: bool


class _Slot:
    """Reusable buffers for one chunk in flight."""

    def __init__(
        self,
        in_bytes: int,
        out_bytes: int,
        n_inputs: int,
        backend: MathBackend,
        follow: bool,
        exact: bool = False,
    ) -> None:
        self.inputs = [backend.buffer(in_bytes) for _ in range(n_inputs)]
        self.out = backend.buffer(out_bytes)
        self.out2 = backend.buffer(out_bytes) if follow else memoryview(b"")
        self.err = bytearray(out_bytes) if exact else bytearray()
        self.result = memoryview(b"")
        self.result2 = memoryview(b"")
        self.neg: memoryview | None = None
        self.data: list[memoryview] = []  # this chunk's bytes of each input
        self.mapped: list[Source] = []  # inputs whose bytes are page-cache views
        self.pending: Pending = _NOTHING  # the chunk's steps, until its outputs are written
        self.stats_step: int | None = None  # the step whose statistics are the tensor's
        self.stats: Stats = (0.0, 0.0)  # else the chunk's, from a pass outside the steps

    def clear(self) -> None:
        self.result = memoryview(b"")
        self.result2 = memoryview(b"")
        self.neg = None
        self.data = []
        self.mapped = []
        self.pending = _NOTHING
        self.stats_step = None
        self.stats = (0.0, 0.0)


def _sources(job: TensorJob) -> tuple[Source, ...]:
    """Every input a combined chunk of ``job`` reads (its follow-up's target last)."""
    return (*job.inputs, job.then.target) if job.then else job.inputs


def _row_elems(shape: tuple[int, ...]) -> int:
    return math.prod(shape[1:]) if len(shape) > 1 else 1


def _chunks(jobs: list[TensorJob], chunk_elems: int) -> Iterator[_Chunk]:
    for j, job in enumerate(jobs):
        rows = job.spec.shape[0] if job.spec.shape else 1
        step = max(1, chunk_elems // max(1, _row_elems(job.spec.shape)))
        for lo, hi, combine in ((0, job.common_rows, True), (job.common_rows, rows, False)):
            for r in range(lo, hi, step):
                yield _Chunk(j, r, min(hi, r + step), combine)


class StreamRunner:
    """Runs a list of tensor jobs into a :class:`ShardedWriter`.

    Args:
        method: the merge method whose math the jobs use.
        backend: where the math runs (CPU or CUDA).
        stage: name reported in progress events.
        progress: optional callback, called after every chunk.
        cancel: optional flag; when set, work stops at the next chunk.
        chunk_elems: elements per chunk (memory per buffer).
        max_read_bps: cap on input bytes read per second (shared storage etiquette);
            None reads as fast as the disk allows.
    """

    def __init__(
        self,
        method: MergeMethod,
        backend: MathBackend,
        *,
        stage: str,
        progress: ProgressCallback | None = None,
        cancel: CancelFlag | None = None,
        chunk_elems: int = CHUNK_ELEMS,
        max_read_bps: float | None = None,
    ) -> None:
        self.method = method
        self.backend = backend
        self.stage = stage
        self.progress = progress
        self.cancel = cancel or threading.Event()
        self.chunk_elems = chunk_elems
        self.max_read_bps = max_read_bps
        self._error: BaseException | None = None
        self._stop = threading.Event()

    def run(
        self, jobs: list[TensorJob], writer: TensorWriter, second: TensorWriter | None = None
    ) -> dict[str, TensorStats]:
        """Produce every job's tensor, in order, through ``writer``; the follow-ups of
        jobs that have one go to ``second``, in the same order.

        Returns:
            Per-tensor statistics for ``residual`` jobs.

        Raises:
            OperationCancelledError: the cancel flag was set or the callback asked to stop.
        """
        follow = any(j.then for j in jobs)
        if follow and second is None:
            raise ValueError("jobs with a follow-up need a second writer")
        n_in = max((len(j.inputs) + (j.then is not None) for j in jobs), default=1)
        in_size = max((s.info.dtype.itemsize for j in jobs for s in _sources(j)), default=4)
        specs = [j.spec for j in jobs] + [j.then.spec for j in jobs if j.then]
        out_size = max((x.dtype.itemsize for x in specs), default=4)
        # A chunk holds at least one row, however long the rows are.
        elems = max([self.chunk_elems, *(_row_elems(j.spec.shape) for j in jobs)])
        free: queue.Queue[_Slot] = queue.Queue()
        for _ in range(_SLOTS):
            free.put(
                _Slot(
                    elems * in_size,
                    elems * out_size,
                    n_in,
                    self.backend,
                    follow,
                    any(j.exact for j in jobs),
                )
            )
        ready: queue.Queue[tuple[_Chunk, _Slot] | None] = queue.Queue()
        done: queue.Queue[tuple[_Chunk, _Slot] | None] = queue.Queue()
        threads = [
            threading.Thread(
                target=self._guard,
                args=(self._read, jobs, free, ready),
                name="realign-read",
                daemon=True,
            ),
            threading.Thread(
                target=self._guard,
                args=(self._write, jobs, (writer, second), done, free),
                name="realign-write",
                daemon=True,
            ),
        ]
        for t in threads:
            t.start()
        self._sums: dict[int, Stats] = {}
        try:
            self._compute(jobs, ready, done)
        except BaseException as exc:
            self._fail(exc)
        finally:
            done.put(None)
            self._stop.set() if self._error else None
            for t in threads:
                t.join()
            self.backend.close()
        if self._error is not None:
            raise self._error
        return {jobs[j].spec.name: TensorStats(math.sqrt(s), m) for j, (s, m) in self._sums.items()}

    def _guard(self, fn: object, *args: object) -> None:
        try:
            fn(*args)  # type: ignore[operator]
        except BaseException as exc:
            self._fail(exc)

    def _fail(self, exc: BaseException) -> None:
        if self._error is None:
            self._error = exc
        self._stop.set()

    def _take(self, q: queue.Queue[_Slot]) -> _Slot | None:
        while not self._stop.is_set():
            try:
                return q.get(timeout=0.05)
            except queue.Empty:
                continue
        return None

    def _read(
        self,
        jobs: list[TensorJob],
        free: queue.Queue[_Slot],
        ready: queue.Queue[tuple[_Chunk, _Slot] | None],
    ) -> None:
        try:
            started, total = time.monotonic(), 0
            for chunk in _chunks(jobs, self.chunk_elems):
                slot = self._take(free)
                if slot is None:
                    return
                job = jobs[chunk.job]
                sources = _sources(job) if chunk.combine else job.inputs[:1]
                for src, buf in zip(sources, slot.inputs, strict=False):
                    slot.data.append(self._load(src, chunk, buf, slot))
                    total += slot.data[-1].nbytes
                if self.max_read_bps:
                    ahead = total / self.max_read_bps - (time.monotonic() - started)
                    self._stop.wait(max(0.0, ahead))
                ready.put((chunk, slot))
        finally:
            ready.put(None)

    def _load(self, src: Source, chunk: _Chunk, buf: memoryview, slot: _Slot) -> memoryview:
        """One input's bytes for ``chunk``: a view of the page cache when the math runs
        on the CPU (no copy: on 2 cores the copy alone cost a fifth of the CPU time of
        a merge), else read into the slot's (pinned) buffer."""
        info = src.info
        n = (chunk.row1 - chunk.row0) * info.row_bytes
        if n and self.backend.maps_inputs and info.offset % info.dtype.itemsize == 0:
            view = src.checkpoint.map_rows(info, chunk.row0, chunk.row1)
            if view is not None:
                slot.mapped.append(src)
                return view
        src.checkpoint.read_into(info, chunk.row0, chunk.row1, buf[:n])
        return buf[:n]

    def _compute(
        self,
        jobs: list[TensorJob],
        ready: queue.Queue[tuple[_Chunk, _Slot] | None],
        done: queue.Queue[tuple[_Chunk, _Slot] | None],
    ) -> None:
        try:
            while (item := self._next(ready)) is not None:
                if self._stop.is_set():
                    break
                if self.cancel.is_set():
                    raise OperationCancelledError(f"{self.stage} cancelled; nothing was published")
                chunk, slot = item
                self._submit(jobs[chunk.job], chunk, slot)
                done.put(item)
        except BaseException as exc:
            self._fail(exc)
        try:  # every chunk handed to the writer gets its outputs (or its error)
            self.backend.flush()
        except BaseException as exc:
            self._fail(exc)

    def _next(self, ready: queue.Queue[tuple[_Chunk, _Slot] | None]) -> tuple[_Chunk, _Slot] | None:
        """The next chunk read. A device backend issues a chunk's math once the next one is
        submitted, so before waiting for the reader (which may wait for a slot the writer
        holds until that math is done) everything submitted is issued."""
        try:
            return ready.get_nowait()
        except queue.Empty:
            self.backend.flush()
            return ready.get()

    def _submit(self, job: TensorJob, chunk: _Chunk, slot: _Slot) -> None:
        """Hand the chunk's steps to the backend (the writer waits for their outputs)."""
        steps: list[Step] = []
        main = self._main_step(job, chunk, slot)
        if main is not None and self._exact_residual(job, chunk, slot):
            main = None  # done, with its rounding error
        if main is not None:
            steps.append(main)
            slot.stats_step = 0 if job.kind == "residual" else None
        if job.then is not None:
            follow = self._follow_step(job, chunk, slot, main is not None)
            steps += [follow] if follow is not None else []
        slot.pending = self.backend.submit(self.method, steps) if steps else _NOTHING
        if job.exact and chunk.combine and slot.neg is None:
            self.backend.flush()
            slot.pending.wait()  # the split reads p on the host
            self._split(job, chunk, slot)

    def _main_step(self, job: TensorJob, chunk: _Chunk, slot: _Slot) -> Step | None:
        """The chunk's own output, or None where its bytes pass through untouched."""
        rows = chunk.row1 - chunk.row0
        sources = job.inputs if chunk.combine else job.inputs[:1]
        out_bytes = rows * (job.spec.nbytes // max(1, job.spec.shape[0] if job.spec.shape else 1))
        kind: str = job.kind
        if not chunk.combine or job.kind == "copy":
            if sources[0].info.dtype == job.spec.dtype:  # pass bytes through untouched
                slot.result = slot.data[0][:out_bytes]
                return None
            kind = "convert"
        operands = tuple((data, s.info.dtype) for s, data in zip(sources, slot.data, strict=False))
        slot.result = slot.out[:out_bytes]
        want = job.kind == "residual"
        return Step(kind, operands, slot.result, job.spec.dtype, job.alpha, want_stats=want)

    def _exact_residual(self, job: TensorJob, chunk: _Chunk, slot: _Slot) -> bool:
        """An exact pack's chunk on the CPU kernel: ``p``, its rounding error and the
        statistics in one pass over the inputs (see
        :func:`app.residuals.native.exact_residual`); False where the backend has none."""
        fused = getattr(self.backend, "exact_residual", None)
        if not (job.exact and chunk.combine and self.method.native and fused is not None):
            return False
        p = slot.result
        neg = memoryview(slot.err)[: p.nbytes]
        i, b = (job.inputs[k].info.dtype for k in (0, 1))
        _, slot.stats = fused((slot.data[0], i), (slot.data[1], b), job.spec.dtype, p, neg)
        slot.neg = neg
        return True

    def _split(self, job: TensorJob, chunk: _Chunk, slot: _Slot) -> None:
        """The rounding error of an exact pack's chunk, beside its ``p`` (see
        :func:`app.residuals.native.exact_split`)."""
        from app.residuals import native

        p = slot.result
        neg = memoryview(slot.err)[: p.nbytes]
        i, b = (job.inputs[k].info.dtype for k in (0, 1))
        spread = getattr(self.backend, "exact_split", None)  # the CPU kernel's threads
        if spread is not None:
            spread((slot.data[0], i), (slot.data[1], b), job.spec.dtype, p, neg)
        else:
            codes = (i.code, b.code)
            native.exact_split(slot.data[0], slot.data[1], job.spec.dtype.code, p, neg, codes)
        slot.neg = neg

    def _follow_step(
        self, job: TensorJob, chunk: _Chunk, slot: _Slot, after_main: bool
    ) -> Step | None:
        """The second output of a chunk: from the first (the previous step, which a device
        backend keeps on the device), or for an exact pack from the inputs, as the fused
        merge computes it; None where it is the first's bytes."""
        then = job.then
        assert then is not None
        n = slot.result.nbytes // job.spec.dtype.itemsize
        out = slot.out2[: n * then.spec.dtype.itemsize]
        first: Operand | Prior = Prior(0) if after_main else (slot.result, job.spec.dtype)
        operands: tuple[Operand | Prior, ...]
        if chunk.combine and job.exact:
            operands = (
                (slot.data[0], job.inputs[0].info.dtype),
                (slot.data[1], job.inputs[1].info.dtype),
                (slot.data[-1], then.target.info.dtype),
            )
            kind = "fused"
        elif chunk.combine:
            operands, kind = (first, (slot.data[-1], then.target.info.dtype)), "apply"
        elif job.spec.dtype == then.spec.dtype:
            slot.result2 = slot.result
            return None
        else:
            operands, kind = (first,), "convert"
        slot.result2 = out
        return Step(kind, operands, out, then.spec.dtype, then.alpha)

    def _write(
        self,
        jobs: list[TensorJob],
        writers: tuple[TensorWriter, TensorWriter | None],
        done: queue.Queue[tuple[_Chunk, _Slot] | None],
        free: queue.Queue[_Slot],
    ) -> None:
        writer, second = writers
        total = sum(j.spec.nbytes for j in jobs)
        written = 0
        finished = 0
        while (item := done.get()) is not None:
            chunk, slot = item
            job = jobs[chunk.job]
            stats = slot.pending.wait()
            if job.kind == "residual":
                step = slot.stats_step
                sq, mx = stats[step] if step is not None else slot.stats
                old = self._sums.get(chunk.job, (0.0, 0.0))
                self._sums[chunk.job] = (old[0] + sq, max(old[1], mx))
            if job.exact:
                cast(PairWriter, writer).write_pair(job.spec.name, slot.result, slot.neg)
            else:
                writer.write(job.spec.name, slot.result)
            written += slot.result.nbytes
            if job.then is not None and second is not None:
                second.write(job.then.spec.name, slot.result2)
            rows = job.spec.shape[0] if job.spec.shape else 1
            finished += chunk.row1 == rows
            for src in slot.mapped:
                src.checkpoint.release_rows(src.info, chunk.row0, chunk.row1)
            slot.clear()
            free.put(slot)
            if self.progress is not None:
                self.progress(
                    Progress(self.stage, finished, len(jobs), written, total, job.spec.name)
                )
