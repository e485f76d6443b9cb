"""Merged weights as a stream of (name, tensor) — for loading straight into a running
engine without writing the merged checkpoint first (in-engine merge)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path

import torch

from app.residuals.apply import check_pack, open_pack, plan_apply
from app.residuals.checkpoint import Checkpoint, TensorInfo
from app.residuals.methods import get_method


def _read(ckpt: Checkpoint, info: TensorInfo) -> torch.Tensor:
    buf = torch.empty(info.nbytes, dtype=torch.uint8)
    ckpt.read_into(info, 0, info.rows, memoryview(buf.numpy()))  # type: ignore[arg-type]
    return buf.view(info.dtype.torch).reshape(info.shape)


def stream_merged(
    pack_dir: Path,
    target_dir: Path,
    alpha: float = 1.0,
    device: str = "cpu",
    names: set[str] | None = None,
    *,
    method: str = "task_arithmetic",
    params: Mapping[str, object] | None = None,
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``target + alpha * R`` tensor by tensor (each element rounded once to the target's
    dtype), exactly the values :func:`app.residuals.apply.apply_residual` writes.

    Args:
        pack_dir: a residual pack directory.
        target_dir: the new base checkpoint.
        alpha: residual scale.
        device: where the math runs and where tensors are yielded.
        names: only these tensors (e.g. to verify a few parameters after a swap).
        method: the merge method; an apply-time one (``ties``, ``dare``) transforms R per
            tensor first, giving the values :func:`app.residuals.multi.apply_residuals`
            writes for this one residual.
        params: the method's parameters (defaults filled in for those left out).

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
    with pack, Checkpoint.open(target_dir) as target:
        jobs = plan_apply(manifest, pack, target, alpha)
        for job in jobs:
            if names is not None and job.spec.name not in names:
                continue
            if job.kind == "copy":
                yield job.spec.name, _read(target, job.inputs[0].info).to(device)
                continue
            r_src, t_src = job.inputs[0], job.inputs[-1]
            r = _read(pack, r_src.info).to(device)
            t = _read(target, t_src.info).to(device)
            common = job.common_rows
            out = torch.empty(job.spec.shape, dtype=job.spec.dtype.torch, device=device)
            delta = r[:common].reshape(-1)
            if job.kind == "fused":  # an exact pack: (p, neg) stand for (instruct, base)
                neg = _read(pack, job.inputs[1].info).to(device)[:common].reshape(-1)
                if merger.per_tensor:
                    delta = merger.merge(
                        [delta.float() - neg.float()], [1.0], checked, job.spec.name
                    )
                    merged, _ = fn.combine("apply", [delta, t.reshape(-1)], alpha, out.dtype)
                else:
                    merged, _ = fn.combine("fused", [delta, neg, t.reshape(-1)], alpha, out.dtype)
                out[:common].copy_(merged.view(t.shape))
                out[common:].copy_(r[common:])
                yield job.spec.name, out
                continue
            if merger.per_tensor:
                delta = merger.merge([delta.float()], [1.0], checked, job.spec.name)
            merged, _ = fn.combine("apply", [delta, t.reshape(-1)], alpha, out.dtype)
            out[:common].copy_(merged.view(t.shape))
            out[common:].copy_(r[common:])  # rows the instruct side added, verbatim
            yield job.spec.name, out
        if names is None:
            check_pack(pack)
