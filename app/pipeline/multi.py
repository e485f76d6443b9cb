"""Merges by an apply-time method (TIES, DARE) or of several residuals at once, into a
directory or into the store; and their preflight.

Every residual is a stored task-arithmetic pack (``R = instruct - base``), computed
first when it is given as a base and instruct pair, so one pack serves every method
and every parameter: the method transforms R while the merged model is written.

As on the task-arithmetic paths, a request is checked from headers first (configs,
tokenizers, safetensors headers: a Hub model's weights are not downloaded for it), a
Hub model is downloaded only once the disk has room for it and what is written from
it, and the target is measured against each residual's base (the lineage check,
recorded in the merged model's manifest and card; unrelated models are refused unless
``force``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from pathlib import Path

from app.core.errors import ArtifactCorruptError
from app.pipeline.context import Ctx, check_alpha
from app.pipeline.lineage import check_models, check_pack_target
from app.pipeline.request import ResidualInput, Run, check_request
from app.pipeline.residual import MergeResult, compute, open_residual

# The store-side steps every merge into the store shares (reuse checked, manifest read).
from app.pipeline.stored import StoredMerge, _checked_reuse, _stored
from app.residuals.apply import open_pack, plan_fused
from app.residuals.checkpoint import Checkpoint
from app.residuals.lineage import combine, unmeasured
from app.residuals.manifest import RESIDUAL_MANIFEST, LineageInfo, ResidualManifest
from app.residuals.methods import Params
from app.residuals.multi import WeightedPack, apply_residuals, plan_residuals
from app.residuals.publish import check_output, staging_dir
from app.residuals.sources import RunOptions, describe_source
from app.residuals.space import ensure_space, merged_bytes, reports_disk_full
from app.store.base import Store
from app.store.keys import merged_key
from app.store.recovery import verify_pack


def _is_dir(ref: str) -> bool:
    return (Path(ref).expanduser() / RESIDUAL_MANIFEST).is_file()


def preflight(
    ctx: Ctx,
    *,
    target: str,
    inputs: Sequence[ResidualInput],
    alpha: float,
    method: str,
    params: dict[str, object] | None,
    force: bool = False,
) -> LineageInfo:
    """Every check that needs no tensor data (configs, tokenizers, safetensors headers:
    a Hub model's are read by ranges, its weights are not downloaded), and the lineage
    check of each residual where the weights are at hand (stored packs: the target
    against the base the pack names; pairs: instruct and target against the base).

    Returns:
        The lineage figures, one record for all the residuals (see ``combine``).

    Raises:
        UnrelatedModelsError: a model is not of its base's lineage and ``force`` is unset.
        RealignError subclasses describing the first problem found.
    """
    check_alpha(alpha)
    check_request(method, params, inputs)
    with ctx.headers(target) as t_ckpt:  # a Hub model's headers: no weights downloaded
        return combine([_check_one(ctx, r, t_ckpt, alpha, force) for r in inputs])


def _check_one(
    ctx: Ctx, r: ResidualInput, t_ckpt: Checkpoint, alpha: float, force: bool
) -> LineageInfo:
    """One residual against the target, from headers; its lineage figures."""
    if r.key is not None:
        with open_residual(r.key, ctx.store) as pack_dir:
            try:
                manifest, pack = open_pack(pack_dir)
            except ArtifactCorruptError:  # the merge quarantines and rebuilds it
                why = f"the stored residual {r.key} is damaged: the merge rebuilds it, checked then"
                return unmeasured(why, max_distance=ctx.settings.lineage_max_distance, force=force)
            with pack:
                plan_residuals([(manifest, pack)], t_ckpt, alpha)
        return check_pack_target(ctx, manifest, t_ckpt, force=force)
    assert r.base is not None and r.instruct is not None
    with ctx.headers(r.instruct) as i_ckpt, ctx.headers(r.base) as b_ckpt:
        plan_fused(i_ckpt, b_ckpt, t_ckpt, alpha)
        return check_models(ctx, b_ckpt, instruct=i_ckpt, target=t_ckpt, force=force)


def _pack_refs(
    ctx: Ctx, inputs: Sequence[ResidualInput], dtype: str, run: Run, opts: RunOptions
) -> tuple[list[str], bool]:
    """Each residual's pack: a pack directory as given, else its full store key (a stored
    pack verified in full, a corrupt one rebuilt; a pair's pack computed when new, its
    Hub models downloaded after a space check).

    Returns:
        The refs, and whether a pack was computed.
    """
    refs, created = [], False
    for r in inputs:
        if r.key is not None:
            ref = r.key if _is_dir(r.key) else ctx.store.resolve(r.key)
            if not _is_dir(r.key):
                verify_pack(ctx.store, ref, run.notice, opts)
            refs.append(ref)
            continue
        assert r.base is not None and r.instruct is not None
        res = compute(
            ctx, r.base, r.instruct, dtype=dtype, device=run.device, progress=run.progress,
            cancel=run.cancel, notice=run.notice, force=run.force,
        )  # fmt: skip
        refs.append(res.key)
        created |= res.created
    return refs, created


@contextlib.contextmanager
def _held(st: Store, refs: Sequence[str]) -> Iterator[list[Path]]:
    """The packs' directories, stored ones held (not evicted) meanwhile."""
    with contextlib.ExitStack() as stack:
        yield [
            Path(ref).expanduser() if _is_dir(ref) else stack.enter_context(st.using(ref))
            for ref in refs
        ]


def _planned(
    packs: Sequence[WeightedPack], t_ckpt: Checkpoint, alpha: float
) -> tuple[list[ResidualManifest], int]:
    """Preflight of the packs against the (downloaded) target: their manifests and the
    merged model's expected size."""
    with contextlib.ExitStack() as stack:
        opened = [open_pack(p.path) for p in packs]
        for _, ck in opened:
            stack.enter_context(ck)
        plan_residuals(opened, t_ckpt, alpha)
        size = merged_bytes(t_ckpt, opened[0][1], packs[0].path / "assets")
    return [m for m, _ in opened], size


def _lineage(
    ctx: Ctx, manifests: Sequence[ResidualManifest], t_ckpt: Checkpoint, force: bool
) -> LineageInfo:
    """The target against the base of each residual (and its instruct model), where the
    pack's manifest finds them on this machine, as a task-arithmetic apply checks it.

    Raises:
        UnrelatedModelsError: the target is not of a base's lineage and ``force`` is unset.
    """
    return combine([check_pack_target(ctx, m, t_ckpt, force=force) for m in manifests])


def _keys(manifests: Sequence[ResidualManifest], packs: Sequence[WeightedPack]) -> list[str]:
    """The packs' keys (a directory's name when it has none)."""
    return [m.key or p.path.name for m, p in zip(manifests, packs, strict=True)]


def _merged_key(keys: list[str], packs: Sequence[WeightedPack], t_digest: str, alpha: float,
                method: str, params: Params) -> str:  # fmt: skip
    weighted = [(k, p.weight) for k, p in zip(keys, packs, strict=True)]
    return merged_key(
        keys[0], t_digest, alpha=alpha, method=method, params=params, residuals=weighted
    )


@reports_disk_full("ctx")
def merge_to_store(
    ctx: Ctx,
    *,
    target: str,
    inputs: Sequence[ResidualInput],
    alpha: float = 1.0,
    method: str = "task_arithmetic",
    params: dict[str, object] | None = None,
    dtype: str = "exact",
    run: Run | None = None,
) -> StoredMerge:
    """Publish ``target + alpha * method(residuals)`` as ``merged/<key>``; the key holds
    the method, its parameters and every residual with its weight. Idempotent."""
    run = run or Run()
    checked = check_request(method, params, inputs)
    preflight(ctx, target=target, inputs=inputs, alpha=alpha, method=method, params=params,
              force=run.force)  # fmt: skip
    st = ctx.store
    opts = ctx.options(run.device, run.progress, run.cancel, None, hash_outputs=True)
    refs, created_residual = _pack_refs(ctx, inputs, dtype, run, opts)
    # A Hub target: downloaded once the disk has room for it and the merged model
    (tgt,) = ctx.fetch([target], lambda t: [(st.root, merged_bytes(t, t, t.path))])
    with _held(st, refs) as dirs, Checkpoint.open(tgt.path) as t_ckpt:
        packs = [WeightedPack(d, r.weight) for d, r in zip(dirs, inputs, strict=True)]
        manifests, size = _planned(packs, t_ckpt, alpha)
        lineage = _lineage(ctx, manifests, t_ckpt, run.force)
        t_src, keys = describe_source(tgt, st.hasher), _keys(manifests, packs)
        key = _merged_key(keys, packs, t_src.digest, alpha, method, checked)
        if not st.exists(key, "merged"):  # free space for the model, before writing
            ensure_space([(st.root, size)])

        def build(tmp: Path) -> None:
            apply_residuals(
                packs, t_ckpt, tmp, target_src=t_src, method=method, params=checked,
                alpha=alpha, opts=opts, lineage=lineage,
            )  # fmt: skip

        stored = [r for r in refs if not _is_dir(r)]
        created = st.get_or_build(key, build, kind="merged", keep=stored)
    done = _stored(st, key, keys[0], created_residual, created)

    def again() -> StoredMerge:
        return merge_to_store(
            ctx, target=target, inputs=inputs, alpha=alpha, method=method, params=params,
            dtype=dtype, run=run,
        )  # fmt: skip

    return _checked_reuse(st, done, again, run.notice)


@reports_disk_full("out", "ctx")
def merge_to_dir(
    ctx: Ctx,
    *,
    target: str,
    inputs: Sequence[ResidualInput],
    out: Path,
    alpha: float = 1.0,
    method: str = "task_arithmetic",
    params: dict[str, object] | None = None,
    dtype: str = "exact",
    run: Run | None = None,
    overwrite: bool = False,
    max_shard_gb: float | None = None,
    hash_outputs: bool = False,
) -> MergeResult:
    """Write ``target + alpha * method(residuals)`` into ``out`` (atomically); pairs'
    packs are computed into the store (or reused) first."""
    run = run or Run()
    checked = check_request(method, params, inputs)
    check_output(out, overwrite=overwrite)
    preflight(ctx, target=target, inputs=inputs, alpha=alpha, method=method, params=params,
              force=run.force)  # fmt: skip
    st = ctx.store
    opts = ctx.options(run.device, run.progress, run.cancel, max_shard_gb, hash_outputs)
    refs, created_residual = _pack_refs(ctx, inputs, dtype, run, opts)
    # A Hub target: downloaded once the disks hold it and the model (at its own shapes)
    (tgt,) = ctx.fetch([target], lambda t: [(out, merged_bytes(t, t, t.path))])
    with _held(st, refs) as dirs, Checkpoint.open(tgt.path) as t_ckpt:
        packs = [WeightedPack(d, r.weight) for d, r in zip(dirs, inputs, strict=True)]
        manifests, size = _planned(packs, t_ckpt, alpha)
        lineage = _lineage(ctx, manifests, t_ckpt, run.force)
        t_src = describe_source(tgt, st.hasher)
        ensure_space([(out, size)])
        with staging_dir(out, overwrite=overwrite) as tmp:
            merged = apply_residuals(
                packs, t_ckpt, tmp, target_src=t_src, method=method, params=checked,
                alpha=alpha, opts=opts, lineage=lineage,
            )  # fmt: skip
    return MergeResult(out, merged, _keys(manifests, packs)[0], created_residual)
