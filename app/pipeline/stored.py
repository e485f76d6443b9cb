"""Merges published in the store (what jobs run), and their preflight."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from app.core.errors import ArtifactCorruptError, InvalidParameterError
from app.pipeline.context import Ctx, check_alpha, dtype_of
from app.pipeline.lineage import check_models, check_pack_target
from app.pipeline.merged import residual_and_merge
from app.pipeline.residual import compute, open_residual
from app.residuals.apply import apply_residual, open_pack, plan_apply, plan_fused
from app.residuals.checkpoint import Checkpoint
from app.residuals.manifest import LineageInfo, MergeManifest, read_merge_manifest
from app.residuals.methods import get_method
from app.residuals.progress import CancelFlag, ProgressCallback
from app.residuals.sources import RunOptions, describe_source
from app.residuals.space import ensure_space, merged_bytes, reports_disk_full, residual_bytes
from app.store.base import Store
from app.store.keys import merged_key, residual_key
from app.store.recovery import Notice, moved_to, notify, with_pack


@dataclass(frozen=True)
class StoredMerge:
    """A merged model published in the store (what the job service records)."""

    key: str
    path: Path
    manifest: MergeManifest
    residual_key: str
    residual_created: bool
    created: bool


def preflight(
    ctx: Ctx,
    *,
    target: str,
    base: str | None = None,
    instruct: str | None = None,
    residual: str | None = None,
    alpha: float = 1.0,
    force: bool = False,
) -> LineageInfo | None:
    """Every check of a merge request made before the merge (see
    ``app.merge.preflight``); returns the figures of the lineage check (None for a
    stored residual found corrupt: the job rebuilds it and checks then)."""
    check_alpha(alpha)
    with ctx.headers(target) as t_ckpt:  # a Hub model's headers: no weights downloaded
        if residual is not None:
            with open_residual(residual, ctx.store) as pack_dir:
                try:
                    manifest, pack = open_pack(pack_dir)
                except ArtifactCorruptError:
                    return None  # the job quarantines and rebuilds it, or says what to do
                with pack:
                    plan_apply(manifest, pack, t_ckpt, alpha)
            return check_pack_target(ctx, manifest, t_ckpt, force=force)
        if base is None or instruct is None:
            raise InvalidParameterError("give either a residual key or both base and instruct")
        with ctx.headers(instruct) as i_ckpt, ctx.headers(base) as b_ckpt:
            plan_fused(i_ckpt, b_ckpt, t_ckpt, alpha)
            return check_models(ctx, b_ckpt, instruct=i_ckpt, target=t_ckpt, force=force)


@reports_disk_full("ctx")
def merge_to_store(
    ctx: Ctx,
    *,
    target: str,
    base: str | None = None,
    instruct: str | None = None,
    residual: str | None = None,
    alpha: float = 1.0,
    dtype: str = "exact",
    method: str = "task_arithmetic",
    device: str = "cpu",
    progress: ProgressCallback | None = None,
    cancel: CancelFlag | None = None,
    notice: Notice | None = None,
    force: bool = False,
) -> StoredMerge:
    """Publish ``target + alpha * R`` as ``merged/<key>`` (see ``app.merge.merge_to_store``)."""
    check_alpha(alpha)
    st = ctx.store

    def again() -> StoredMerge:
        return merge_to_store(
            ctx, target=target, base=base, instruct=instruct, residual=residual,
            alpha=alpha, dtype=dtype, method=method, device=device, progress=progress,
            cancel=cancel, notice=notice, force=force,
        )  # fmt: skip

    created_residual = False
    opts = ctx.options(device, progress, cancel, None, hash_outputs=True)
    res_key = residual
    lineage: LineageInfo | None = None
    if res_key is None:
        if base is None or instruct is None:
            raise InvalidParameterError("give either a residual key or both base and instruct")
        first, lineage = _store_first_merge(
            ctx, (instruct, base, target), alpha, dtype, method, opts, force
        )
        if first is not None:
            return _checked_reuse(st, first, again, notice)
        res = compute(
            ctx, base, instruct, dtype=dtype, method=method, device=device,
            progress=progress, cancel=cancel, notice=notice, verify_pack=False, force=force,
        )  # fmt: skip
        res_key, created_residual = res.key, res.created
    # A Hub target is downloaded once the disk has room for it and the merged model
    # (estimated at the target's own shapes and assets).
    (tgt,) = ctx.fetch([target], lambda t: [(st.root, merged_bytes(t, t, t.path))])

    def use(pack_dir: Path) -> tuple[str, bool, str]:
        with Checkpoint.open(tgt.path) as t_ckpt:
            manifest, pack = open_pack(pack_dir)
            with pack:
                plan_apply(manifest, pack, t_ckpt, alpha)
            info = lineage or check_pack_target(ctx, manifest, t_ckpt, force=force)
            t_src = describe_source(tgt, st.hasher)
            key = merged_key(manifest.key or pack_dir.name, t_src.digest, alpha=alpha)
            if not st.exists(key, "merged"):  # free space for the model, before writing
                ensure_space([(st.root, merged_bytes(t_ckpt, pack, pack_dir / "assets"))])
            created = st.get_or_build(
                key,
                lambda tmp: apply_residual(
                    pack_dir,
                    t_ckpt,
                    tmp,
                    target_src=t_src,
                    alpha=alpha,
                    opts=opts,
                    lineage=info,
                ),
                kind="merged",
            )
        return key, created, manifest.key or res_key

    key, created, rkey = with_pack(st, res_key, use, notice, opts)
    done = _stored(st, key, rkey, created_residual, created)
    return _checked_reuse(st, done, again, notice)


def _stored(st: Store, key: str, rkey: str, created_residual: bool, created: bool) -> StoredMerge:
    with st.using(key, "merged") as path:
        merged = read_merge_manifest(path)
    return StoredMerge(key, path, merged, rkey, created_residual, created)


def _store_first_merge(
    ctx: Ctx,
    inputs: tuple[str, str, str],
    alpha: float,
    dtype: str,
    method: str,
    opts: RunOptions,
    force: bool,
) -> tuple[StoredMerge | None, LineageInfo]:
    """``merge_to_store`` when the residual is not stored yet: one pass publishes the
    residual (of ``method``) and the merged model (None when the residual exists:
    apply it instead), with the figures of the triple's lineage check. ``inputs``: the
    (instruct, base, target) refs."""
    get_method(method)  # an unknown name fails before any input is resolved
    st = ctx.store

    def outputs(i: Checkpoint, b: Checkpoint, t: Checkpoint) -> list[tuple[Path, int]]:
        return [(st.root, residual_bytes(i, dtype_of(dtype)) + merged_bytes(t, i, i.path))]

    refs = ctx.fetch(list(inputs), outputs)  # Hub weights: after a space check
    with contextlib.ExitStack() as stack:
        i_c, b_c, t_c = (stack.enter_context(Checkpoint.open(r.path)) for r in refs)
        plan_fused(i_c, b_c, t_c, alpha)
        lineage = check_models(ctx, b_c, instruct=i_c, target=t_c, force=force)
        i_src, b_src, t_src = (describe_source(r, st.hasher) for r in refs)
        key = residual_key(i_src.digest, b_src.digest, method=method, dtype=dtype)
        if st.exists(key):
            return None, lineage
        mkey = merged_key(key, t_src.digest, alpha=alpha)
        if not st.exists(mkey, "merged"):  # free space for pack and model, before writing
            need = residual_bytes(i_c, dtype_of(dtype)) + merged_bytes(t_c, i_c, i_c.path)
            ensure_space([(st.root, need)])
        built: list[bool] = []

        def build(tmp: Path) -> None:
            _, created = residual_and_merge(
                st, key, (i_c, b_c, t_c), (i_src, b_src, t_src), tmp,
                dtype=dtype_of(dtype), alpha=alpha, method=method, opts=opts,
                lineage=lineage,
            )  # fmt: skip
            built.append(created)

        created = st.get_or_build(mkey, build, kind="merged", keep=(key,))
    return _stored(st, mkey, key, bool(built) and built[0], created), lineage


def _checked_reuse(
    st: Store, done: StoredMerge, again: Callable[[], StoredMerge], notice: Notice | None
) -> StoredMerge:
    """``done`` once its shards match their sha256 (a model built by this call was
    hashed as it was written); a corrupt one is quarantined and built again."""
    if done.created:
        return done
    try:
        st.verify_merged(done.key)
        return done
    except ArtifactCorruptError as exc:
        moved = st.quarantine(done.key, "merged", str(exc))
        notify(
            notice,
            f"merged model {done.key}: {exc.file} did not match its recorded checksum; it was "
            f"{moved_to(moved)} and is being built again",
        )
    return again()
