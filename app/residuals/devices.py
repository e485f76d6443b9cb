"""Where the merge math runs: a small registry of math backends.

The CPU backend works on cache-sized sub-chunks so the fp32 temporaries never
leave L2; the CUDA backend moves each chunk to the GPU from pinned buffers
(reads and writes overlap with GPU work through the stream pipeline).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

import torch

from app.core.errors import DeviceUnavailableError
from app.residuals.methods import MergeMethod

_SUB_ELEMS = 256 * 1024


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


class CpuBackend:
    """fp32 math on the CPU, in L2-sized pieces."""

    name = "cpu"
    pin_memory = False

    def __init__(self) -> None:
        self._acc: dict[torch.dtype, torch.Tensor] = {}

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
        dtype = _acc_dtype(inputs)
        acc_full = self._acc.get(dtype)
        if acc_full is None:
            acc_full = self._acc[dtype] = torch.empty(_SUB_ELEMS, dtype=dtype)
        flat_in = [x.reshape(-1) for x in inputs]
        flat_out = out.reshape(-1)
        sq, mx = 0.0, 0.0
        for s in range(0, flat_out.numel(), _SUB_ELEMS):
            e = min(flat_out.numel(), s + _SUB_ELEMS)
            acc = acc_full[: e - s]
            _run(method, kind, acc, [x[s:e] for x in flat_in], alpha)
            if want_stats:
                sq += float(torch.dot(acc, acc))
                mx = max(mx, float(acc.abs().max()))
            flat_out[s:e].copy_(acc)
        return sq, mx


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
