"""Apply-time merge methods and several residuals in one pass: ``target + alpha *
merge(R_1, ..., R_n)`` written tensor by tensor.

TIES needs a per-tensor magnitude threshold, so this path reads whole tensors: one
tensor of the target and the same tensor of each residual pack at a time (never two
full models), merged in fp32 by the method (:mod:`app.residuals.sparsify`), then
``target + alpha * delta`` rounded once to the target's dtype by the math backend's
task-arithmetic ``apply`` step, the very step a task-arithmetic apply takes. So TIES at
density 1 or DARE at drop rate 0 of one residual give task arithmetic's bits.

Peak memory: the largest tensor in fp32, a few times over (the method's temporaries),
plus that tensor of each residual; never a whole model.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import app
from app.core.errors import IncompatibleModelsError, OperationCancelledError
from app.residuals.apply import check_pack, finish_merged, merged_writer, open_pack, plan_apply
from app.residuals.checkpoint import Checkpoint, TensorInfo
from app.residuals.devices import MathBackend, make_backend
from app.residuals.dtypes import F32
from app.residuals.manifest import (
    FileEntry,
    LineageInfo,
    MergeManifest,
    ResidualManifest,
    ResidualUse,
    SourceInfo,
    written_entries,
)
from app.residuals.methods import MergeMethod, Params, get_method
from app.residuals.progress import Progress
from app.residuals.shards import ShardedWriter
from app.residuals.sources import RunOptions
from app.residuals.tensorjobs import Source, TensorJob

if TYPE_CHECKING:
    import torch

Opened = tuple[ResidualManifest, Checkpoint]


@dataclass(frozen=True)
class WeightedPack:
    """One residual pack of a merge and its weight."""

    path: Path
    weight: float = 1.0


@dataclass(frozen=True)
class _Plan:
    """Each output tensor's job (from the first pack) and its source in every pack."""

    jobs: list[TensorJob]
    sources: dict[str, tuple[tuple[Source, ...], ...]]
    """Per output tensor, each pack's sources: ``(r,)``, or ``(p, neg)`` of an exact pack
    (``r = p - neg``)."""


def plan_residuals(opened: Sequence[Opened], target: Checkpoint, alpha: float) -> _Plan:
    """Match ``target`` against every pack (headers only); the output order is the first
    pack's.

    Raises:
        IncompatibleModelsError: the target does not fit a pack, the packs differ in
            tensors or shapes, or several packs where one adds vocabulary rows.
    """
    plans = [plan_apply(m, ck, target, alpha) for m, ck in opened]
    if len(opened) > 1:
        for m, _ in opened:
            if m.vocab is not None:
                raise IncompatibleModelsError(
                    f"residual {m.key or m.instruct.ref} adds vocabulary rows "
                    f"({m.vocab.base_rows} -> {m.vocab.instruct_rows}): such a residual can "
                    "only be applied alone, not together with others"
                )
    first = {j.spec.name: j for j in plans[0] if j.kind != "copy"}
    sources: dict[str, tuple[tuple[Source, ...], ...]] = {}
    for (m, _), jobs in zip(opened, plans, strict=True):
        mine = {j.spec.name: j for j in jobs if j.kind != "copy"}
        if mine.keys() != first.keys():
            odd = sorted(mine.keys() ^ first.keys())[0]
            raise IncompatibleModelsError(
                f"{odd}: merged by one residual but not by {m.key or m.instruct.ref} — the "
                "residuals are not of the same architecture"
            )
        for name, job in mine.items():
            sources[name] = (*sources.get(name, ()), job.inputs[:-1])
    return _Plan(plans[0], sources)


def _read(ckpt: Checkpoint, info: TensorInfo, row0: int, row1: int) -> torch.Tensor:
    """Rows ``[row0, row1)`` of a tensor as a flat CPU tensor of its dtype."""
    import torch

    buf = torch.empty((row1 - row0) * info.row_bytes, dtype=torch.uint8)
    if buf.numel():
        ckpt.read_into(info, row0, row1, _bytes(buf))
    return buf.view(info.dtype.torch)


def residual_rows(group: Sequence[Source], rows: int, device: str) -> torch.Tensor:
    """Rows ``[0, rows)`` of one pack's residual as a flat fp32 tensor on ``device``: ``r``,
    or an exact pack's ``p - neg`` (rounded once), read in blocks of a few frames so that
    each frame is decoded once for both (a pack keeps only its last frames decoded)."""
    import torch

    if len(group) == 1:
        return _read(group[0].checkpoint, group[0].info, 0, rows).to(device).float()
    p, neg = group
    width = p.info.row_bytes // p.info.dtype.itemsize if p.info.rows else 0
    out = torch.empty(rows * width, dtype=torch.float32, device=device)
    step = max(1, _PAIR_ELEMS // max(1, width))
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        block = _read(p.checkpoint, p.info, r0, r1).to(device).float()
        block -= _read(neg.checkpoint, neg.info, r0, r1).to(device).float()
        out[r0 * width : r1 * width] = block
    return out


_PAIR_ELEMS = 4 * 1024 * 1024  # below the frames an exact pack keeps decoded (12M elements)


def _bytes(t: torch.Tensor) -> memoryview:
    """The bytes of a CPU tensor (of any dtype, bfloat16 too), writable."""
    import torch

    flat = t.contiguous().view(-1).view(torch.uint8)
    return memoryview(cast(Any, flat.numpy())).cast("B")


@dataclass
class _Writer:
    """The per-tensor merge of one model: method, weights, math backend, output."""

    method: MergeMethod
    params: Params
    weights: list[float]
    alpha: float
    device: str
    backend: MathBackend

    def _delta(self, group: Sequence[Source], rows: int) -> torch.Tensor:
        return residual_rows(group, rows, self.device)

    def tensor(self, job: TensorJob, sources: Sequence[Sequence[Source]]) -> memoryview:
        """The output bytes of one merged tensor."""
        import torch

        target = job.inputs[-1]
        common, rows = job.common_rows, job.spec.shape[0] if job.spec.shape else 1
        t = _read(target.checkpoint, target.info, 0, target.info.rows)
        deltas = [self._delta(group, common) for group in sources]
        delta = self.method.merge(deltas, self.weights, self.params, job.spec.name)
        delta = delta.to("cpu", torch.float32).contiguous()
        out = torch.empty(job.spec.nbytes, dtype=torch.uint8)
        dst = _bytes(out)
        done = delta.numel() * job.spec.dtype.itemsize
        self.backend.combine(
            get_method("task_arithmetic"), "apply",
            [(_bytes(delta), F32), (_bytes(t), target.info.dtype)],
            dst[:done], job.spec.dtype, self.alpha, want_stats=False,
        )  # fmt: skip
        if rows > common:  # rows the instruct side added: its values, as they are
            pack = sources[0][0]
            extra = _read(pack.checkpoint, pack.info, common, rows)
            dst[done:] = _bytes(extra.to(job.spec.dtype.torch))
        return dst

    def run(self, plan: _Plan, writer: ShardedWriter, opts: RunOptions) -> None:
        total = sum(j.spec.nbytes for j in plan.jobs)
        written, read, started = 0, 0, time.monotonic()
        cancel = opts.cancel or threading.Event()
        for i, job in enumerate(plan.jobs):
            if opts.max_read_bps:  # shared storage etiquette, as the streaming paths keep
                cancel.wait(max(0.0, read / opts.max_read_bps - (time.monotonic() - started)))
            if cancel.is_set():
                raise OperationCancelledError("apply cancelled; nothing was published")
            sources = plan.sources.get(job.spec.name, ())
            read += job.inputs[-1].info.nbytes + sum(s.info.nbytes for g in sources for s in g)
            if job.kind == "copy":
                src = job.inputs[0]
                data = _bytes(_read(src.checkpoint, src.info, 0, src.info.rows))
            else:
                data = self.tensor(job, sources)
            writer.write(job.spec.name, data)
            written += data.nbytes
            if opts.progress is not None:
                opts.progress(
                    Progress("apply", i + 1, len(plan.jobs), written, total, job.spec.name)
                )


def apply_residuals(
    packs: Sequence[WeightedPack],
    target: Checkpoint,
    out_dir: Path,
    *,
    target_src: SourceInfo,
    method: str,
    params: Params,
    alpha: float = 1.0,
    opts: RunOptions | None = None,
    lineage: LineageInfo | None = None,
) -> MergeManifest:
    """Write ``target + alpha * method(w_1 R_1, ..., w_n R_n)`` (each element rounded once to
    the target's dtype) as a model directory into the empty ``out_dir``.

    Args:
        packs: the residual packs and their weights, in order (the first one's
            tokenizer, chat template and generation config are the merged model's).
        target: the new base checkpoint.
        out_dir: empty staging directory.
        target_src: identity of ``target`` for provenance.
        method: a registered merge method.
        params: its parameters (checked, defaults filled in: see ``check_params``).
        alpha: scale of the merged residual.
        opts: device, progress, cancellation, shard size, output hashing.
        lineage: figures of the lineage check, for the manifest.

    Raises:
        IncompatibleModelsError: the target does not fit a residual.
        ArtifactCorruptError: a pack's bytes did not match their checksums.
        OperationCancelledError: cancelled; the caller discards ``out_dir``.
    """
    opts = opts or RunOptions()
    m = get_method(method)
    with contextlib.ExitStack() as stack:
        opened = [open_pack(p.path) for p in packs]
        for _, ck in opened:
            stack.enter_context(ck)
        plan = plan_residuals(opened, target, alpha)
        backend = make_backend(opts.device)
        stack.callback(backend.close)
        weights = [p.weight for p in packs]
        work = _Writer(m, params, weights, alpha, opts.device, backend)
        with merged_writer(out_dir, [j.spec for j in plan.jobs], opts) as writer:
            work.run(plan, writer, opts)
        for _, ck in opened:
            check_pack(ck)  # nothing made from a corrupt pack gets published
        files = written_entries(writer)
    manifests = [mf for mf, _ in opened]
    merged = _manifest(manifests, packs, target_src, method, params, alpha, files, lineage)
    first = manifests[0]
    return finish_merged(
        out_dir, merged, target, packs[0].path / "assets", dict(first.special_tokens)
    )


def _manifest(
    manifests: list[ResidualManifest],
    packs: Sequence[WeightedPack],
    target_src: SourceInfo,
    method: str,
    params: Params,
    alpha: float,
    files: dict[str, FileEntry],
    lineage: LineageInfo | None,
) -> MergeManifest:
    first = manifests[0]
    return MergeManifest(
        method=method,
        alpha=alpha,
        fused=False,
        residual_key=first.key,
        residual_dtype=first.dtype,
        instruct=first.instruct,
        base=first.base,
        target=target_src,
        tool_version=app.__version__,
        vocab=first.vocab,
        lineage=lineage,
        files=files,
        params=params,
        residuals=[
            ResidualUse(
                key=mf.key, weight=p.weight, dtype=mf.dtype,
                instruct=mf.instruct.ref, base=mf.base.ref,
            )
            for mf, p in zip(manifests, packs, strict=True)
        ],
    )  # fmt: skip
