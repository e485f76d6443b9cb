"""Merged weights as a stream of (name, tensor) — for loading straight into a running
engine without writing the merged checkpoint first (in-engine merge).

Each tensor is merged in row blocks into one preallocated output tensor, so the extra
memory a merge takes is bounded by a scratch budget (``REALIGN_INLINE_SCRATCH_MB``)
whatever the tensor's size: a block's input rows are read from the pack and the target
(into pinned host buffers on CUDA, two sets so reading the next block overlaps the
copy of this one) and combined, and its temporaries are freed before the next block.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from math import prod
from pathlib import Path

import torch

from app.residuals.apply import check_pack, open_pack, plan_apply
from app.residuals.checkpoint import Checkpoint, TensorInfo
from app.residuals.methods import MergeMethod, Params, get_method
from app.residuals.multi import residual_rows
from app.residuals.tensorjobs import Source, TensorJob

DEFAULT_SCRATCH_BYTES = 512 * 1024 * 1024
COMBINE_BYTES = 80
"""Scratch of the exact formula per element (:func:`app.residuals.torch_math.combine`:
fp32 copies of the inputs, masks, TwoSum tails, the result). Peaks measured on weight-like
data: 38 bytes (fused, alpha 1, into bf16), 64 (fused, alpha 0.7, into bf16), 74 (fused,
alpha -2, into fp32); elements recomputed exactly add a little where they are many."""

BlockHook = Callable[[str, int, int], None]
"""Called with (tensor name, first row, end row) for each block merged or copied."""


def _read(ckpt: Checkpoint, info: TensorInfo) -> torch.Tensor:
    buf = torch.empty(info.nbytes, dtype=torch.uint8)
    ckpt.read_into(info, 0, info.rows, memoryview(buf.numpy()))  # type: ignore[arg-type]
    return buf.view(info.dtype.torch).reshape(info.shape)


def block_rows(
    row_elems: int, input_itemsizes: Sequence[int], scratch_bytes: int, cuda: bool
) -> int:
    """Rows per block so that one block's scratch stays within ``scratch_bytes``.

    A block holds its input rows in host buffers (two sets on CUDA), on CUDA a device
    copy of them too, and the formula's temporaries (:data:`COMBINE_BYTES` per
    element). A single row larger than the budget is still merged, alone.

    Args:
        row_elems: elements per row (the product of the shape past the first axis).
        input_itemsizes: bytes per element of each input read per row.
        scratch_bytes: the budget.
        cuda: whether blocks are copied to a CUDA device.

    Returns:
        At least 1.
    """
    inputs = sum(input_itemsizes)
    per_elem = (3 if cuda else 1) * inputs + COMBINE_BYTES
    return max(1, scratch_bytes // max(1, row_elems * per_elem))


@dataclass
class _Blocks:
    """Reads row blocks of some sources into reused host buffers and hands them out as
    flat tensors on the device."""

    sources: Sequence[Source]
    rows: int
    device: torch.device

    def __post_init__(self) -> None:
        self.cuda = self.device.type == "cuda"
        sets = 2 if self.cuda else 1
        self.host = [
            torch.empty((sets, max(1, self.rows * s.info.row_bytes)), dtype=torch.uint8,
                        pin_memory=self.cuda)
            for s in self.sources
        ]  # fmt: skip
        self.done: list[torch.cuda.Event | None] = [None] * sets

    def read(self, k: int, lo: int, hi: int) -> list[torch.Tensor]:
        """Rows ``[lo, hi)`` of every source, block number ``k``."""
        slot = k % len(self.done)
        event = self.done[slot]
        if event is not None:  # its last copies to the device must be over before reuse
            event.synchronize()
        xs = []
        for src, host in zip(self.sources, self.host, strict=True):
            buf = host[slot, : (hi - lo) * src.info.row_bytes]
            src.checkpoint.read_into(src.info, lo, hi, memoryview(buf.numpy()))  # type: ignore[arg-type]
            xs.append(buf.view(src.info.dtype.torch).to(self.device, non_blocking=self.cuda))
        if self.cuda:
            done = torch.cuda.Event()  # type: ignore[no-untyped-call]
            done.record()
            self.done[slot] = done
        return xs

    def close(self) -> None:
        """Wait for copies in flight, then drop the host buffers."""
        for event in self.done:
            if event is not None:
                event.synchronize()
        self.host.clear()


def _in_blocks(
    job: TensorJob,
    fn: MergeMethod,
    device: torch.device,
    scratch_bytes: int,
    on_block: BlockHook | None,
) -> torch.Tensor:
    """The output of an ``apply``, ``fused`` or ``copy`` job, merged block by block."""
    spec = job.spec
    out = torch.empty(spec.shape, dtype=spec.dtype.torch, device=device)
    flat = out.view(-1)
    row_elems = prod(spec.shape[1:]) if spec.shape else 1
    combined = () if job.kind == "copy" else job.inputs
    verbatim = job.inputs[:1]  # rows from common_rows on (a copy job: all of them)
    rows_total = spec.shape[0] if spec.shape else 1
    phases = ((combined, 0, job.common_rows), (verbatim, job.common_rows, rows_total))
    for sources, lo_row, hi_row in phases:
        if not sources or hi_row <= lo_row:
            continue
        sizes = [s.info.dtype.itemsize for s in sources]
        step = block_rows(row_elems, sizes, scratch_bytes, device.type == "cuda")
        blocks = _Blocks(sources, step, device)
        for k, lo in enumerate(range(lo_row, hi_row, step)):
            hi = min(hi_row, lo + step)
            xs = blocks.read(k, lo, hi)
            dst = flat[lo * row_elems : hi * row_elems]
            if sources is combined:
                merged, _ = fn.combine(job.kind, xs, job.alpha, out.dtype)
                dst.copy_(merged)
                del merged
            else:
                dst.copy_(xs[0])
            del xs
            if on_block is not None:
                on_block(spec.name, lo, hi)
        blocks.close()
    return out


def _whole(
    job: TensorJob, fn: MergeMethod, merger: MergeMethod, checked: Params, device: str
) -> torch.Tensor:
    """A per-tensor method (ties, dare): the whole residual tensor at once (its scratch is
    not bounded by the budget: the method needs every element of R)."""
    r_src, t_src = job.inputs[0], job.inputs[-1]
    r = _read(r_src.checkpoint, r_src.info).to(device)
    t = _read(t_src.checkpoint, t_src.info).to(device)
    common = job.common_rows
    out = torch.empty(job.spec.shape, dtype=job.spec.dtype.torch, device=device)
    if job.kind == "fused":  # an exact pack: (p, neg) stand for (instruct, base)
        delta = residual_rows(job.inputs[:-1], common, device)
    else:
        delta = r[:common].reshape(-1).float()
    delta = merger.merge([delta], [1.0], checked, job.spec.name)
    merged, _ = fn.combine("apply", [delta, t.reshape(-1)], job.alpha, out.dtype)
    out[:common].copy_(merged.view(t.shape))
    out[common:].copy_(r[common:])  # rows the instruct side added, verbatim
    return out


def stream_merged(
    pack_dir: Path,
    target_dir: Path,
    alpha: float = 1.0,
    device: str = "cpu",
    names: set[str] | None = None,
    *,
    method: str = "task_arithmetic",
    params: Mapping[str, object] | None = None,
    scratch_bytes: int = DEFAULT_SCRATCH_BYTES,
    on_block: BlockHook | None = None,
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``target + alpha * R`` tensor by tensor (each element rounded once to the target's
    dtype), exactly the values :func:`app.residuals.apply.apply_residual` writes.

    Args:
        pack_dir: a residual pack directory.
        target_dir: the new base checkpoint.
        alpha: residual scale.
        device: where the math runs and where tensors are yielded (``cpu``, ``cuda[:N]``).
        names: only these tensors (e.g. to verify a few parameters after a swap).
        method: the merge method; an apply-time one (``ties``, ``dare``) transforms R per
            tensor first, giving the values :func:`app.residuals.multi.apply_residuals`
            writes for this one residual. Such methods need the whole tensor's R, so their
            scratch is not bounded by ``scratch_bytes``.
        params: the method's parameters (defaults filled in for those left out).
        scratch_bytes: bound on the memory one block takes besides the yielded tensor
            (at least one row is merged at a time, whatever its size).
        on_block: called for each block merged or copied, with (name, row0, row1).

    Raises:
        IncompatibleModelsError: the target does not fit the residual (checked first).
        ArtifactCorruptError: after the last tensor, when the pack's bytes did not match
            their recorded checksums (hashed as they were read; not checked for ``names``):
            the caller must not mark the engine ready.
    """
    merger = get_method(method)
    checked = merger.check_params(params or {})
    manifest, pack = open_pack(pack_dir)
    fn = get_method(manifest.method)
    where = torch.device(device)
    with pack, Checkpoint.open(target_dir) as target:
        for job in plan_apply(manifest, pack, target, alpha):
            if names is not None and job.spec.name not in names:
                continue
            if merger.per_tensor and job.kind != "copy":
                out = _whole(job, fn, merger, checked, device)
            else:
                out = _in_blocks(job, fn, where, scratch_bytes, on_block)
            yield job.spec.name, out
            del out
        if names is None:
            check_pack(pack)
