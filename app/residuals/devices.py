"""Where the merge math runs: a small registry of math backends.

The CPU backend works on cache-sized sub-chunks so the fp32 temporaries never
leave L2, split across a few of its own threads; the CUDA backend moves each
chunk to the GPU from pinned buffers (reads and writes overlap with GPU work
through the stream pipeline).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Protocol

import torch

from app.core.errors import DeviceUnavailableError
from app.residuals.methods import MergeMethod

# ATen runs an element-wise op serially when it has at most this many elements
# (at::internal::GRAIN_SIZE). Sub-chunks of this size keep every op out of the
# OpenMP pool: on a loaded machine an OpenMP team synchronising 4 times per
# sub-chunk against our own reader and writer threads ran the math 10-30x
# slower. The parallelism is ours instead, coarse-grained: one slice of each
# chunk per worker thread.
_SUB_ELEMS = 32 * 1024
_MAX_WORKERS = 4  # past this the math is memory-bound


class MathBackend(Protocol):
    """Combines one chunk of inputs into an output buffer."""

    name: str
    pin_memory: bool

    def combine(
        self,
        method: MergeMethod,
        kind: str,
        inputs: Sequence[torch.Tensor],
        out: torch.Tensor,
        alpha: float,
        *,
        want_stats: bool,
    ) -> tuple[float, float]:
        """Write the method's ``kind`` result into ``out``; return (sum of squares,
        max |x|) of the fp32 result when ``want_stats``, else zeros."""


def _run(
    method: MergeMethod, kind: str, acc: torch.Tensor, xs: Sequence[torch.Tensor], alpha: float
) -> None:
    if kind == "residual":
        method.residual(acc, xs[0], xs[1])
    elif kind == "apply":
        method.apply(acc, xs[0], xs[1], alpha)
    elif kind == "fused":
        method.fused(acc, xs[0], xs[1], xs[2], alpha)
    else:
        raise ValueError(f"unknown job kind {kind!r}")


def _acc_dtype(inputs: Sequence[torch.Tensor]) -> torch.dtype:
    return torch.float64 if any(x.dtype == torch.float64 for x in inputs) else torch.float32


def _stats(acc: torch.Tensor) -> tuple[float, float]:
    # Not torch.dot: BLAS starts its own thread team for it, and on a busy 2-core
    # machine one call on 32K floats took ~1 ms instead of ~5 us.
    lo, hi = torch.aminmax(acc)
    return float(torch.linalg.vector_norm(acc)) ** 2, max(float(hi), -float(lo))


class CpuBackend:
    """fp32 math on the CPU, in L2-sized pieces, on ``workers`` threads.

    Args:
        workers: threads sharing each chunk; default ``torch.get_num_threads()``
            of the creating thread (at most 4), so a process that limits torch's
            threads limits this backend too.
    """

    name = "cpu"
    pin_memory = False

    def __init__(self, workers: int | None = None) -> None:
        n = workers if workers is not None else min(_MAX_WORKERS, torch.get_num_threads())
        self.workers = max(1, n)
        self._local = threading.local()
        self._pool: ThreadPoolExecutor | None = None

    def _acc(self, dtype: torch.dtype) -> torch.Tensor:
        accs: dict[torch.dtype, torch.Tensor] | None = getattr(self._local, "accs", None)
        if accs is None:
            accs = self._local.accs = {}
        acc = accs.get(dtype)
        if acc is None:
            acc = accs[dtype] = torch.empty(_SUB_ELEMS, dtype=dtype)
        return acc

    def combine(
        self,
        method: MergeMethod,
        kind: str,
        inputs: Sequence[torch.Tensor],
        out: torch.Tensor,
        alpha: float,
        *,
        want_stats: bool,
    ) -> tuple[float, float]:
        flat_in = [x.reshape(-1) for x in inputs]
        flat_out = out.reshape(-1)
        n = flat_out.numel()
        parts = min(self.workers, -(-n // _SUB_ELEMS))
        step = -(-n // max(1, parts) // _SUB_ELEMS) * _SUB_ELEMS
        bounds = [(s, min(n, s + step)) for s in range(0, n, step)] if n else []
        if self._pool is None and len(bounds) > 1:
            self._pool = ThreadPoolExecutor(self.workers - 1, thread_name_prefix="realign-math")
        args = (method, kind, flat_in, flat_out, alpha, want_stats)
        futures: list[Future[list[tuple[float, float]]]] = [
            self._pool.submit(self._combine_range, *args, lo, hi)  # type: ignore[union-attr]
            for lo, hi in bounds[1:]
        ]
        stats = self._combine_range(*args, *bounds[0]) if bounds else []
        for f in futures:
            stats += f.result()
        # Summed in sub-chunk order whatever the worker count: same stats every run.
        sq, mx = 0.0, 0.0
        for s, m in stats:
            sq += s
            mx = max(mx, m)
        return sq, mx

    def _combine_range(
        self,
        method: MergeMethod,
        kind: str,
        flat_in: list[torch.Tensor],
        flat_out: torch.Tensor,
        alpha: float,
        want_stats: bool,
        lo: int,
        hi: int,
    ) -> list[tuple[float, float]]:
        acc_full = self._acc(_acc_dtype(flat_in))
        stats: list[tuple[float, float]] = []
        pieces = zip(
            *(torch.split(x[lo:hi], _SUB_ELEMS) for x in flat_in),
            torch.split(flat_out[lo:hi], _SUB_ELEMS),
            strict=True,
        )
        for *xs, o in pieces:
            acc = acc_full if o.numel() == _SUB_ELEMS else acc_full[: o.numel()]
            _run(method, kind, acc, xs, alpha)
            if want_stats:
                stats.append(_stats(acc))
            o.copy_(acc)
        return stats

    def close(self) -> None:
        """Stop the worker threads (they also end with the process)."""
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None


class CudaBackend:
    """fp32 math on a CUDA device; chunks arrive from pinned host memory."""

    name = "cuda"
    pin_memory = True

    def __init__(self, device: str = "cuda") -> None:
        if not torch.cuda.is_available():
            raise DeviceUnavailableError(
                "--device cuda was asked for but torch sees no CUDA device here "
                f"(torch {torch.__version__}); use --device cpu or install a CUDA build of torch"
            )
        self.device = torch.device(device)
        self.stream = torch.cuda.Stream(self.device)  # type: ignore[no-untyped-call]

    def combine(
        self,
        method: MergeMethod,
        kind: str,
        inputs: Sequence[torch.Tensor],
        out: torch.Tensor,
        alpha: float,
        *,
        want_stats: bool,
    ) -> tuple[float, float]:
        with torch.cuda.stream(self.stream):
            xs = [x.to(self.device, non_blocking=True) for x in inputs]
            acc = torch.empty(out.shape, dtype=_acc_dtype(inputs), device=self.device)
            _run(method, kind, acc, xs, alpha)
            stats = (0.0, 0.0)
            if want_stats:
                stats = (
                    float(torch.dot(acc.reshape(-1), acc.reshape(-1))),
                    float(acc.abs().max()) if acc.numel() else 0.0,
                )
            out.copy_(acc.to(out.dtype), non_blocking=True)
        self.stream.synchronize()  # the writer thread reads `out` next
        return stats


BACKENDS: dict[str, Callable[[], MathBackend]] = {"cpu": CpuBackend, "cuda": CudaBackend}


def make_backend(device: str) -> MathBackend:
    """Build the math backend for ``cpu``, ``cuda`` or ``cuda:N``.

    Raises:
        DeviceUnavailableError: unknown device, or CUDA asked for where there is none.
    """
    kind = device.split(":", 1)[0]
    if kind == "cuda":
        return CudaBackend(device)
    factory = BACKENDS.get(kind)
    if factory is None:
        raise DeviceUnavailableError(f"unknown device {device!r}; use cpu or cuda")
    return factory()
