"""Residual verbs: compute a pack into the store, apply a pack to a target."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from app.core.errors import CorruptCheckpointError
from app.pipeline.context import Ctx, check_alpha, dtype_of
from app.pipeline.lineage import check_models, check_pack_target
from app.residuals.apply import apply_residual, open_pack, plan_apply
from app.residuals.checkpoint import Checkpoint
from app.residuals.compute import compute_residual, preflight_residual
from app.residuals.manifest import (
    RESIDUAL_MANIFEST,
    LineageInfo,
    MergeManifest,
    ResidualManifest,
    read_residual_manifest,
)
from app.residuals.methods import pack_method
from app.residuals.progress import CancelFlag, ProgressCallback
from app.residuals.publish import check_output, staging_dir
from app.residuals.sources import describe_source
from app.residuals.space import ensure_space, merged_bytes, reports_disk_full, residual_bytes
from app.store.base import Store
from app.store.keys import residual_key
from app.store.recovery import Notice, reuse_pack, with_pack


@dataclass(frozen=True)
class ComputeResult:
    key: str
    path: Path
    manifest: ResidualManifest
    created: bool
    lineage: LineageInfo | None = None  # figures of the lineage check


@dataclass(frozen=True)
class MergeResult:
    out: Path
    manifest: MergeManifest
    residual_key: str | None
    residual_created: bool


@reports_disk_full("ctx")
def compute(
    ctx: Ctx,
    base: str,
    instruct: str,
    *,
    dtype: str = "exact",
    method: str = "task_arithmetic",
    device: str = "cpu",
    progress: ProgressCallback | None = None,
    cancel: CancelFlag | None = None,
    max_shard_gb: float | None = None,
    notice: Notice | None = None,
    verify_pack: bool = True,
    force: bool = False,
) -> ComputeResult:
    """Compute (or reuse) the residual pack of ``instruct - base`` in the store (see
    ``app.merge.compute``)."""
    st, torch_dtype = ctx.store, dtype_of(dtype)
    method = pack_method(method)  # apply-time methods (ties, dare) share the R = I - B pack
    # Hub weights are downloaded once the disk has room for them and the pack
    ins, bas = ctx.fetch([instruct, base], lambda i, b: [(st.root, residual_bytes(i, torch_dtype))])
    with Checkpoint.open(ins.path) as i_ckpt, Checkpoint.open(bas.path) as b_ckpt:
        preflight_residual(i_ckpt, b_ckpt)  # headers only: refuse before hashing gigabytes
        lineage = check_models(ctx, b_ckpt, instruct=i_ckpt, force=force)  # sampled rows
        i_src, b_src = describe_source(ins, st.hasher), describe_source(bas, st.hasher)
        key = residual_key(i_src.digest, b_src.digest, method=method, dtype=dtype)
        opts = ctx.options(device, progress, cancel, max_shard_gb)
        if not st.exists(key):  # free space for the pack, before writing
            ensure_space([(st.root, residual_bytes(i_ckpt, torch_dtype))])

        def build(tmp: Path) -> None:
            compute_residual(
                i_ckpt, b_ckpt, tmp, instruct_src=i_src, base_src=b_src,
                dtype=torch_dtype, method=method, key=key, opts=opts,
            )  # fmt: skip

        created = st.get_or_build(key, build)
        path = st.path(key)
        manifest = (
            read_residual_manifest(path)
            if created
            else reuse_pack(st, key, build, notice, full=verify_pack)
        )
    return ComputeResult(key, path, manifest, created, lineage)


@contextlib.contextmanager
def open_residual(residual: str, st: Store) -> Iterator[Path]:
    """A pack directory given as a path, or a stored one by key (pinned meanwhile)."""
    candidate = Path(residual).expanduser()
    if (candidate / RESIDUAL_MANIFEST).is_file():
        yield candidate
        return
    if candidate.exists():
        raise CorruptCheckpointError(f"{candidate} is not a residual pack (no {RESIDUAL_MANIFEST})")
    with st.using(st.resolve(residual)) as path:
        yield path


@reports_disk_full("out", "ctx")
def apply(
    ctx: Ctx,
    residual: str,
    target: str,
    out: Path,
    *,
    alpha: float = 1.0,
    device: str = "cpu",
    progress: ProgressCallback | None = None,
    cancel: CancelFlag | None = None,
    overwrite: bool = False,
    max_shard_gb: float | None = None,
    hash_outputs: bool = False,
    notice: Notice | None = None,
    force: bool = False,
    lineage: LineageInfo | None = None,
) -> MergeResult:
    """Apply a stored residual (key, key prefix or pack directory) to ``target``,
    writing a model directory at ``out`` atomically (see ``app.merge.apply``).

    ``lineage``: the figures of a check the caller made (else the target is checked
    against the residual's base, where that is at hand)."""
    check_alpha(alpha)
    st = ctx.store
    check_output(out, overwrite=overwrite)
    # A Hub target: downloaded once the disks hold it and the model (at its own shapes)
    (tgt,) = ctx.fetch([target], lambda t: [(out, merged_bytes(t, t, t.path))])
    opts = ctx.options(device, progress, cancel, max_shard_gb, hash_outputs)

    def use(pack_dir: Path) -> MergeResult:
        with Checkpoint.open(tgt.path) as t_ckpt:
            manifest, pack = open_pack(pack_dir)
            with pack:
                plan_apply(manifest, pack, t_ckpt, alpha)  # preflight before hashing the target
            info = lineage or check_pack_target(ctx, manifest, t_ckpt, force=force)
            t_src = describe_source(tgt, st.hasher)
            ensure_space([(out, merged_bytes(t_ckpt, pack, pack_dir / "assets"))])
            with staging_dir(out, overwrite=overwrite) as tmp:
                merged = apply_residual(
                    pack_dir, t_ckpt, tmp, target_src=t_src, alpha=alpha, opts=opts,
                    lineage=info,
                )  # fmt: skip
        return MergeResult(out, merged, manifest.key, False)

    return with_pack(st, residual, use, notice, opts)
