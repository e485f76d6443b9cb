"""Where the merge math runs: a small registry of math backends.

Backends work on raw bytes (memoryviews) and :class:`DType`s, so the streaming
pipeline never needs torch. ``cpu`` is the native kernel (one pass in C per chunk,
split across a few threads; ctypes releases the GIL) when it is built, else torch
on the CPU; ``cuda`` is torch on a GPU, fed from pinned buffers. All of them give
the same bits: every element correctly rounded once (see :mod:`app.residuals.methods`).
"""

from __future__ import annotations

import logging
import mmap
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Protocol, TypeVar

from app.core.errors import DeviceUnavailableError
from app.residuals import native
from app.residuals.dtypes import DType
from app.residuals.methods import MergeMethod
from app.residuals.steps import Operand, Pending, Stats, Step, run_steps

_T = TypeVar("_T")

log = logging.getLogger(__name__)

_MAX_WORKERS = 4  # past this the math is memory-bound
_MIN_SPLIT = 64 * 1024  # elements: below this one thread does the whole chunk
_NATIVE_CODES = frozenset({"F32", "BF16", "F16"})


class MathBackend(Protocol):
    """Combines one chunk of inputs into an output buffer."""

    name: str
    maps_inputs: bool  # inputs may be views of the page cache (else read into buffer())

    def buffer(self, nbytes: int) -> memoryview:
        """A writable byte buffer for chunk inputs or outputs (pinned where that helps)."""

    def combine(
        self,
        method: MergeMethod,
        kind: str,
        inputs: Sequence[Operand],
        out: memoryview,
        out_dtype: DType,
        alpha: float,
        *,
        want_stats: bool,
    ) -> Stats:
        """Write the method's ``kind`` result into ``out``; return (sum of squares,
        max |x|) of the fp32 result when ``want_stats``, else zeros."""

    def submit(self, method: MergeMethod, steps: Sequence[Step]) -> Pending:
        """Start one chunk's steps (a device backend keeps a step's result on the device
        for the steps that read it); the outputs are in host memory once the result's
        ``wait()`` returns, and the host inputs must stay untouched until then."""

    def flush(self) -> None:
        """Issue everything submitted so far (so that every pending result completes)."""

    def close(self) -> None:
        """Release threads and device resources."""


def usable_cpus() -> int:
    """The CPUs this process may run on: its affinity (a container's cpuset, taskset)
    on Linux, elsewhere all of them."""
    affinity = getattr(os, "sched_getaffinity", None)
    return max(1, len(affinity(0)) if affinity is not None else (os.cpu_count() or 1))


def default_workers() -> int:
    """Math threads for this process: the CPUs it may run on, at most 4."""
    return min(_MAX_WORKERS, usable_cpus())


def host_buffer(nbytes: int) -> memoryview:
    """Anonymous, page-aligned memory (also right for ``O_DIRECT``)."""
    return memoryview(mmap.mmap(-1, max(1, nbytes)))


def _native_types(out_dtype: DType, inputs: Sequence[Operand]) -> bool:
    return out_dtype.code in _NATIVE_CODES and all(dt.code in _NATIVE_CODES for _, dt in inputs)


class NativeBackend:
    """The C kernel on the CPU: one pass per chunk, split over ``workers`` threads.

    Args:
        workers: threads sharing each chunk (default :func:`default_workers`).
    """

    name = "cpu"
    maps_inputs = True

    def __init__(self, workers: int | None = None) -> None:
        self.workers = max(1, workers or default_workers())
        self._pool: ThreadPoolExecutor | None = None
        self._fallback: MathBackend | None = None

    def buffer(self, nbytes: int) -> memoryview:
        return host_buffer(nbytes)

    def combine(
        self,
        method: MergeMethod,
        kind: str,
        inputs: Sequence[Operand],
        out: memoryview,
        out_dtype: DType,
        alpha: float,
        *,
        want_stats: bool,
    ) -> tuple[float, float]:
        if not method.native or not _native_types(out_dtype, inputs):
            if self._fallback is None:
                from app.residuals.torch_backends import TorchCpuBackend

                self._fallback = TorchCpuBackend()
            return self._fallback.combine(
                method, kind, inputs, out, out_dtype, alpha, want_stats=want_stats
            )
        n = out.nbytes // out_dtype.itemsize

        def run(lo: int, hi: int) -> tuple[float, float]:
            return native.combine(
                kind,
                out[lo * out_dtype.itemsize : hi * out_dtype.itemsize],
                out_dtype.code,
                [(mv[lo * dt.itemsize : hi * dt.itemsize], dt.code) for mv, dt in inputs],
                alpha,
                want_stats=want_stats,
            )

        stats = self._spread(run, n)
        # Summed in range order whatever the thread timing: same stats every run.
        return sum(s for s, _ in stats), max(m for _, m in stats)

    def submit(self, method: MergeMethod, steps: Sequence[Step]) -> Pending:
        return run_steps(self.combine, method, steps)

    def flush(self) -> None:
        pass

    def _spread(self, run: Callable[[int, int], _T], n: int) -> list[_T]:
        """``run`` over ``[0, n)`` cut into whole pages, one range per worker thread."""
        parts = max(1, min(self.workers, n // _MIN_SPLIT))
        step = max(4096, -(-n // parts // 4096) * 4096)  # whole pages of every operand
        bounds = [(lo, min(n, lo + step)) for lo in range(0, n, step)] or [(0, 0)]
        if len(bounds) > 1 and self._pool is None:
            self._pool = ThreadPoolExecutor(self.workers - 1, thread_name_prefix="realign-math")
        futures = [self._pool.submit(run, lo, hi) for lo, hi in bounds[1:]] if self._pool else []
        return [run(*bounds[0]), *(f.result() for f in futures)]

    def exact_split(
        self,
        instruct: Operand,
        base: Operand,
        dtype: DType,
        p: memoryview,
        neg: memoryview,
    ) -> int:
        """:func:`app.residuals.native.exact_split` over the worker threads (the inputs
        with their own dtypes)."""
        (i, di), (b, db), size = instruct, base, dtype.itemsize

        def run(lo: int, hi: int) -> int:
            return native.exact_split(
                i[lo * di.itemsize : hi * di.itemsize],
                b[lo * db.itemsize : hi * db.itemsize],
                dtype.code,
                p[lo * size : hi * size],
                neg[lo * size : hi * size],
                (di.code, db.code),
            )

        return sum(self._spread(run, p.nbytes // size))

    def exact_residual(
        self,
        instruct: Operand,
        base: Operand,
        dtype: DType,
        p: memoryview,
        neg: memoryview,
    ) -> tuple[int, tuple[float, float]]:
        """:func:`app.residuals.native.exact_residual` over the worker threads, with the
        ``residual`` kind's statistics summed as :meth:`combine` sums them."""
        (i, di), (b, db), size = instruct, base, dtype.itemsize

        def run(lo: int, hi: int) -> tuple[int, tuple[float, float]]:
            return native.exact_residual(
                i[lo * di.itemsize : hi * di.itemsize],
                b[lo * db.itemsize : hi * db.itemsize],
                dtype.code,
                p[lo * size : hi * size],
                neg[lo * size : hi * size],
                (di.code, db.code),
                want_stats=True,
            )

        parts = self._spread(run, p.nbytes // size)
        stats = (sum(s for _, (s, _) in parts), max(m for _, (_, m) in parts))
        return sum(c for c, _ in parts), stats

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None
        if self._fallback is not None:
            self._fallback.close()


def _cpu() -> MathBackend:
    if native.available():
        return NativeBackend()
    from app.residuals.torch_backends import TorchCpuBackend

    log.warning("native merge kernel unavailable (%s); using torch on the CPU", native.load_error())
    return TorchCpuBackend()


def _cuda(device: str) -> MathBackend:
    from app.residuals.torch_backends import CudaBackend

    return CudaBackend(device)


BACKENDS: dict[str, Callable[[str], MathBackend]] = {
    "cpu": lambda _device: _cpu(),
    "cuda": _cuda,
}


def parse_device(device: str) -> tuple[str, int | None]:
    """Split ``cpu``, ``cuda`` or ``cuda:N`` into (kind, index) without touching a device.

    Raises:
        DeviceUnavailableError: anything else.
    """
    kind, sep, index = device.strip().lower().partition(":")
    if kind == "cpu" and not sep:
        return kind, None
    if kind == "cuda" and (not sep or index.isdigit()):
        return kind, int(index) if sep else None
    raise DeviceUnavailableError(
        f"unknown device {device!r}; use cpu, cuda or cuda:N (N = 0, 1, ...)"
    )


def check_device(device: str) -> str:
    """Check that ``device`` exists here, before any input is read (one-line errors).

    Args:
        device: ``cpu``, ``cuda`` or ``cuda:N``.

    Returns:
        The device in canonical form (``cuda:1``).

    Raises:
        DeviceUnavailableError: a bad string, CUDA asked for where torch sees none, or a
            GPU index past the last GPU.
    """
    kind, index = parse_device(device)
    if kind == "cpu":
        return kind
    import torch  # only for CUDA: the CPU path needs no torch to check

    if not torch.cuda.is_available():
        raise DeviceUnavailableError(
            f"device {device!r} asked for but torch sees no CUDA device here "
            f"(torch {torch.__version__}); use --device cpu / REALIGN_DEVICE=cpu, or run where "
            "a GPU and a CUDA build of torch are"
        )
    count = torch.cuda.device_count()
    if index is not None and index >= count:
        raise DeviceUnavailableError(
            f"device {device!r}: this machine has {count} CUDA device(s), cuda:0 to "
            f"cuda:{count - 1}; pick one of those (CUDA_VISIBLE_DEVICES renumbers them from 0)"
        )
    return kind if index is None else f"{kind}:{index}"


def make_backend(device: str) -> MathBackend:
    """Build the math backend for ``cpu``, ``cuda`` or ``cuda:N``.

    Raises:
        DeviceUnavailableError: unknown device, or CUDA asked for where there is none.
    """
    return BACKENDS[parse_device(device)[0]](device)
