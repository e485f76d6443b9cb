"""The torch math backends: CUDA, and the CPU fallback where the native kernel is
not built. Same bits as the native kernel (:mod:`app.residuals.torch_math`).

:class:`StagedBackend` runs torch on one device behind three lanes (upload, compute,
download) scheduled by :class:`app.residuals.overlap.Overlap`; :class:`CudaBackend` is it
on CUDA streams, fed from pinned host buffers. The same class on the CPU (host lanes)
runs the same data flow synchronously, which is how the tests check it without a GPU.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from functools import partial
from typing import Any, cast

import torch

from app.core.errors import DeviceUnavailableError
from app.residuals.devices import host_buffer
from app.residuals.dtypes import DType
from app.residuals.methods import MergeMethod
from app.residuals.overlap import Lanes, Overlap, Ticket
from app.residuals.steps import Operand, Pending, Prior, Stats, Step, check_steps, run_steps

# Pieces of this many elements keep the fp32 temporaries of the exact formula
# (about 20 per element) in the caches.
_PIECE = 256 * 1024


def as_tensor(view: memoryview, dtype: DType) -> torch.Tensor:
    """A 1-D tensor over the bytes of ``view`` (no copy; read-only views too)."""
    if not view.nbytes:
        return torch.empty(0, dtype=dtype.torch)
    flat = torch.frombuffer(cast(Any, view), dtype=torch.uint8)
    return flat.view(dtype.torch)


def _stats(s: torch.Tensor, want: bool) -> Stats:
    if not want or not s.numel():
        return 0.0, 0.0
    lo, hi = torch.aminmax(s)
    return float(torch.linalg.vector_norm(s, dtype=torch.float64)) ** 2, max(float(hi), -float(lo))


def _device_stats(s: torch.Tensor) -> torch.Tensor:
    """:func:`_stats` as a float64 pair left on ``s``'s device (reading it would block)."""
    if not s.numel():
        return torch.zeros(2, dtype=torch.float64, device=s.device)
    lo, hi = torch.aminmax(s)
    sq = torch.linalg.vector_norm(s, dtype=torch.float64).square()
    return torch.stack([sq, torch.maximum(hi, -lo).double()])


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
    ) -> Stats:
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

    def submit(self, method: MergeMethod, steps: Sequence[Step]) -> Pending:
        return run_steps(self.combine, method, steps)

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


def _host_views(steps: Sequence[Step]) -> list[memoryview]:
    """The distinct host inputs of ``steps`` (a view two steps read is uploaded once)."""
    seen: dict[int, memoryview] = {}
    for step in steps:
        for op in step.operands:
            if not isinstance(op, Prior):
                seen.setdefault(id(op[0]), op[0])
    return list(seen.values())


def _hold(t: torch.Tensor) -> None:
    """Keep the allocator from reusing ``t``'s memory before the current lane's work on it
    is done (the tensor was made on another lane)."""
    if t.is_cuda:
        t.record_stream(torch.cuda.current_stream(t.device))


def _download(
    steps: Sequence[Step],
    outs: Sequence[torch.Tensor],
    stats: Sequence[torch.Tensor | None],
    host_stats: Sequence[torch.Tensor | None],
) -> None:
    """Copy each step's result (and statistics) into host memory (on the download lane)."""
    for step, res, s, h in zip(steps, outs, stats, host_stats, strict=True):
        as_tensor(step.out, step.out_dtype).copy_(res, non_blocking=True)
        _hold(res)
        if s is not None and h is not None:
            h.copy_(s, non_blocking=True)
            _hold(s)


@dataclass(frozen=True)
class _Staged:
    """A chunk in flight on a :class:`StagedBackend`."""

    ticket: Ticket[Any]
    stats: list[torch.Tensor | None]  # host float64 pairs, written by the download

    def wait(self) -> list[Stats]:
        self.ticket.wait()
        return [(float(h[0]), float(h[1])) if h is not None else (0.0, 0.0) for h in self.stats]


class StagedBackend:
    """Torch on one device; each chunk's inputs are copied into device staging slots on
    an upload lane, combined on a compute lane and copied back on a download lane, so
    consecutive chunks overlap (:mod:`app.residuals.overlap`). The steps of one chunk
    run back to back on the device: an earlier step's result is read there, not copied
    to the host and back.

    Args:
        device: where the math runs.
        lanes: the upload, compute and download lanes of ``device``.
        pinned: page-locked host buffers (needed for copies that do not block the host).
    """

    name = "staged"
    maps_inputs = False

    def __init__(self, device: torch.device, lanes: Lanes[Any], *, pinned: bool) -> None:
        self.device = device
        self._overlap: Overlap[Any] = Overlap(lanes)
        self._pin = pinned
        self._staging: list[list[torch.Tensor]] = [[] for _ in range(self._overlap.depth)]
        self._buffers: list[torch.Tensor] = []

    def buffer(self, nbytes: int) -> memoryview:
        t = torch.empty(max(1, nbytes), dtype=torch.uint8, pin_memory=self._pin)
        self._buffers.append(t)  # the view does not keep the tensor alive
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
    ) -> Stats:
        step = Step(kind, tuple(inputs), out, out_dtype, alpha, want_stats)
        pending = self.submit(method, [step])
        self.flush()
        return pending.wait()[0]

    def submit(self, method: MergeMethod, steps: Sequence[Step]) -> Pending:
        """Queue one chunk's steps; they run once the next chunk is queued or at
        :meth:`flush`. The host inputs must stay untouched until the result's ``wait``."""
        check_steps(steps)
        views = _host_views(steps)
        host_stats = [self._host_stats() if s.want_stats else None for s in steps]
        ticket = self._overlap.submit(
            partial(self._upload, views), partial(self._compute, method, steps, host_stats)
        )
        return _Staged(ticket, host_stats)

    def flush(self) -> None:
        """Issue the work of the last chunk submitted."""
        self._overlap.flush()

    def close(self) -> None:
        try:
            self._overlap.close()
        finally:
            self._staging = [[] for _ in self._staging]
            self._buffers.clear()

    def _host_stats(self) -> torch.Tensor:
        return torch.zeros(2, dtype=torch.float64, pin_memory=self._pin)

    def _stage(self, slot: int, i: int, nbytes: int) -> torch.Tensor:
        """Staging buffer ``i`` of ``slot``, grown to ``nbytes`` where it is smaller."""
        bufs = self._staging[slot]
        if len(bufs) <= i:
            bufs.append(torch.empty(0, dtype=torch.uint8, device=self.device))
        if bufs[i].numel() < nbytes:
            bufs[i] = torch.empty(nbytes, dtype=torch.uint8, device=self.device)
        return bufs[i][:nbytes]

    def _upload(self, views: list[memoryview], slot: int) -> dict[int, torch.Tensor]:
        staged = {}
        for i, view in enumerate(views):
            dev = self._stage(slot, i, view.nbytes)
            if view.nbytes:
                dev.copy_(torch.frombuffer(cast(Any, view), dtype=torch.uint8), non_blocking=True)
            staged[id(view)] = dev
        return staged

    def _compute(
        self,
        method: MergeMethod,
        steps: Sequence[Step],
        host_stats: list[torch.Tensor | None],
        staged: dict[int, torch.Tensor],
    ) -> Callable[[], None]:
        outs: list[torch.Tensor] = []
        stats: list[torch.Tensor | None] = []
        for step in steps:
            xs = [
                outs[op.index] if isinstance(op, Prior) else staged[id(op[0])].view(op[1].torch)
                for op in step.operands
            ]
            res, s = method.combine(step.kind, xs, step.alpha, step.out_dtype.torch)
            outs.append(res)
            stats.append(_device_stats(s) if step.want_stats else None)
        return partial(_download, steps, outs, stats, host_stats)


class _Stream:
    """A CUDA stream as an :class:`app.residuals.overlap.Lane`."""

    def __init__(self, device: torch.device) -> None:
        self.stream = torch.cuda.Stream(device)  # type: ignore[no-untyped-call]

    def wait(self, event: torch.cuda.Event) -> None:
        self.stream.wait_event(event)

    def record(self) -> torch.cuda.Event:
        return cast(torch.cuda.Event, self.stream.record_event())

    def active(self) -> AbstractContextManager[object]:
        return torch.cuda.stream(self.stream)

    def synchronize(self) -> None:
        self.stream.synchronize()


class CudaBackend(StagedBackend):
    """Torch on a CUDA device: a copy stream each way and a compute stream, ordered by
    events (no device-wide synchronization), chunks from pinned host buffers.

    Args:
        device: ``cuda`` (the current device) or ``cuda:N``.

    Raises:
        DeviceUnavailableError: torch sees no CUDA device.
    """

    name = "cuda"

    def __init__(self, device: str = "cuda") -> None:
        if not torch.cuda.is_available():
            raise DeviceUnavailableError(
                "--device cuda was asked for but torch sees no CUDA device here "
                f"(torch {torch.__version__}); use --device cpu or install a CUDA build of torch"
            )
        where = torch.device(device)
        if where.index is None:
            where = torch.device("cuda", torch.cuda.current_device())
        lanes = Lanes(_Stream(where), _Stream(where), _Stream(where))
        super().__init__(where, lanes, pinned=True)
