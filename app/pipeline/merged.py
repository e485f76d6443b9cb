"""``target + alpha * (instruct - base)`` into a directory, one pass when it can."""

from __future__ import annotations

import contextlib
from pathlib import Path

from app.pipeline.context import Ctx, check_alpha, dtype_of
from app.pipeline.lineage import check_models
from app.pipeline.residual import MergeResult, apply, compute
from app.residuals.apply import apply_residual, merge_fused, plan_fused
from app.residuals.checkpoint import Checkpoint
from app.residuals.dtypes import DType
from app.residuals.manifest import LineageInfo, MergeManifest, SourceInfo
from app.residuals.methods import get_method
from app.residuals.onepass import compute_and_apply
from app.residuals.progress import CancelFlag, ProgressCallback
from app.residuals.publish import check_output, staging_dir
from app.residuals.sources import RunOptions, describe_source
from app.residuals.space import ensure_space, merged_bytes, reports_disk_full, residual_bytes
from app.store.base import Store
from app.store.keys import residual_key
from app.store.recovery import Notice


@reports_disk_full("out", "ctx")
def merge(
    ctx: Ctx,
    base: str,
    instruct: str,
    target: str,
    out: Path,
    *,
    alpha: float = 1.0,
    dtype: str = "exact",
    device: str = "cpu",
    no_cache: bool = False,
    progress: ProgressCallback | None = None,
    cancel: CancelFlag | None = None,
    overwrite: bool = False,
    max_shard_gb: float | None = None,
    hash_outputs: bool = False,
    method: str = "task_arithmetic",
    notice: Notice | None = None,
    force: bool = False,
) -> MergeResult:
    """``target + alpha * (instruct - base)`` into ``out`` (see ``app.merge.merge``)."""
    check_alpha(alpha)
    st, res_dtype = ctx.store, dtype_of(dtype)
    get_method(method)
    check_output(out, overwrite=overwrite)

    def outputs(i: Checkpoint, b: Checkpoint, t: Checkpoint) -> list[tuple[Path, int]]:
        merged = (out, merged_bytes(t, i, i.path))
        return [merged] if no_cache else [(st.root, residual_bytes(i, res_dtype)), merged]

    refs = ctx.fetch([instruct, base, target], outputs)  # Hub weights: after a space check
    opts = ctx.options(device, progress, cancel, max_shard_gb, hash_outputs)
    with contextlib.ExitStack() as stack:
        ckpts = [stack.enter_context(Checkpoint.open(r.path)) for r in refs]
        i_c, b_c, t_c = ckpts
        plan_fused(i_c, b_c, t_c, alpha)  # preflight of the whole triple, headers only
        lineage = check_models(ctx, b_c, instruct=i_c, target=t_c, force=force)
        ensure_space([(out, merged_bytes(t_c, i_c, i_c.path))])  # before hashing or writing
        if no_cache:
            srcs = [describe_source(r, st.hasher) for r in refs]
            with staging_dir(out, overwrite=overwrite) as tmp:
                merged = merge_fused(
                    i_c, b_c, t_c, tmp, sources=(srcs[0], srcs[1], srcs[2]),
                    alpha=alpha, method=method, opts=opts, lineage=lineage,
                )  # fmt: skip
            return MergeResult(out, merged, None, False)
        i_src, b_src = (describe_source(r, st.hasher) for r in refs[:2])
        key = residual_key(i_src.digest, b_src.digest, method=method, dtype=dtype)
        if not st.exists(key):
            t_src = describe_source(refs[2], st.hasher)
            ensure_space(
                [(st.root, residual_bytes(i_c, res_dtype)),
                 (out, merged_bytes(t_c, i_c, i_c.path))]
            )  # fmt: skip
            with staging_dir(out, overwrite=overwrite) as tmp:
                merged, created = residual_and_merge(
                    st, key, (i_c, b_c, t_c), (i_src, b_src, t_src), tmp,
                    dtype=res_dtype, alpha=alpha, method=method, opts=opts, lineage=lineage,
                )  # fmt: skip
            return MergeResult(out, merged, key, created)
    res = compute(
        ctx, base, instruct, dtype=dtype, method=method, device=device, progress=progress,
        cancel=cancel, max_shard_gb=max_shard_gb, notice=notice,
        verify_pack=False,  # the apply below verifies it as it reads
        force=force,
    )  # fmt: skip
    done = apply(
        ctx, res.key, target, out, alpha=alpha, device=device, progress=progress,
        cancel=cancel, overwrite=overwrite, max_shard_gb=max_shard_gb,
        hash_outputs=hash_outputs, notice=notice, force=force, lineage=lineage,
    )  # fmt: skip
    return MergeResult(out, done.manifest, res.key, res.created)


def residual_and_merge(
    st: Store,
    key: str,
    ckpts: tuple[Checkpoint, Checkpoint, Checkpoint],
    sources: tuple[SourceInfo, SourceInfo, SourceInfo],
    out_dir: Path,
    *,
    dtype: DType,
    alpha: float,
    method: str,
    opts: RunOptions,
    lineage: LineageInfo | None = None,
) -> tuple[MergeManifest, bool]:
    """Build residual ``key`` in the store and write the merged model into ``out_dir``
    in one pass; if another process stored the residual meanwhile, apply that one.

    Returns:
        The merged model's manifest, and whether this call built the residual.
    """
    made: list[MergeManifest] = []

    def build(res_dir: Path) -> None:
        _, merged = compute_and_apply(
            *ckpts, res_dir, out_dir, sources=sources, dtype=dtype, alpha=alpha,
            method=method, key=key, opts=opts, lineage=lineage,
        )  # fmt: skip
        made.append(merged)

    if st.get_or_build(key, build):
        return made[0], True
    with st.using(key) as pack_dir:
        merged = apply_residual(
            pack_dir, ckpts[2], out_dir, target_src=sources[2], alpha=alpha, opts=opts,
            lineage=lineage,
        )  # fmt: skip
    return merged, False
