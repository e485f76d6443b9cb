"""The torch math backends: CUDA, and the CPU fallback where the native kernel is
not built. Same bits as the native kernel (:mod:`app.residuals.torch_math`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, cast

import torch

from app.core.errors import DeviceUnavailableError
from app.residuals.devices import Operand, host_buffer
from app.residuals.dtypes import DType
from app.residuals.methods import MergeMethod

# Pieces of this many elements keep the fp32 temporaries of the exact formula
# (about 20 per element) in the caches.
_PIECE = 256 * 1024


def as_tensor(view: memoryview, dtype: DType) -> torch.Tensor:
    """A 1-D tensor over the bytes of ``view`` (no copy; read-only views too)."""
    if not view.nbytes:
        return torch.empty(0, dtype=dtype.torch)
    flat = torch.frombuffer(cast(Any, view), dtype=torch.uint8)
    return flat.view(dtype.torch)


def _stats(s: torch.Tensor, want: bool) -> tuple[float, float]:
    if not want or not s.numel():
        return 0.0, 0.0
    lo, hi = torch.aminmax(s)
    return float(torch.linalg.vector_norm(s, dtype=torch.float64)) ** 2, max(float(hi), -float(lo))


class TorchCpuBackend:
    """Torch on the CPU, in cache-sized pieces (used when the native kernel is absent)."""

    name = "cpu-torch"
    maps_inputs = True

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
        xs = [as_tensor(mv, dt) for mv, dt in inputs]
        dst = as_tensor(out, out_dtype)
        sq, mx = 0.0, 0.0
        for lo in range(0, dst.numel(), _PIECE):
            hi = min(dst.numel(), lo + _PIECE)
            res, s = method.combine(kind, [x[lo:hi] for x in xs], alpha, out_dtype.torch)
            dst[lo:hi].copy_(res)
            piece_sq, piece_mx = _stats(s, want_stats)
            sq, mx = sq + piece_sq, max(mx, piece_mx)
        return sq, mx

    def close(self) -> None:
        pass


class CudaBackend:
    """Torch on a CUDA device; chunks arrive from pinned host memory."""

    name = "cuda"
    maps_inputs = False

    def __init__(self, device: str = "cuda") -> None:
        if not torch.cuda.is_available():
            raise DeviceUnavailableError(
                "--device cuda was asked for but torch sees no CUDA device here "
                f"(torch {torch.__version__}); use --device cpu or install a CUDA build of torch"
            )
        self.device = torch.device(device)
        self.stream = torch.cuda.Stream(self.device)  # type: ignore[no-untyped-call]
        self._pinned: list[torch.Tensor] = []

    def buffer(self, nbytes: int) -> memoryview:
        t = torch.empty(max(1, nbytes), dtype=torch.uint8, pin_memory=True)
        self._pinned.append(t)  # the view does not keep the tensor alive
        return memoryview(cast(Any, t.numpy()))

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
        with torch.cuda.stream(self.stream):
            xs = [as_tensor(mv, dt).to(self.device, non_blocking=True) for mv, dt in inputs]
            res, s = method.combine(kind, xs, alpha, out_dtype.torch)
            stats = _stats(s, want_stats)
            as_tensor(out, out_dtype).copy_(res, non_blocking=True)
        self.stream.synchronize()  # the writer thread reads `out` next
        return stats

    def close(self) -> None:
        self._pinned.clear()
