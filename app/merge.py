"""The Python API of the residual engine — the verbs of the ``realign`` CLI.

Everything above the pure core (job service, CLI, demo) calls these functions;
none of them re-implements merge logic.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from app.core.errors import (
    ArtifactCorruptError,
    ArtifactInUseError,
    ArtifactNotFoundError,
    CorruptCheckpointError,
    InvalidParameterError,
)
from app.core.settings import Settings, get_settings
from app.residuals.apply import apply_residual, merge_fused, open_pack, plan_apply, plan_fused
from app.residuals.checkpoint import Checkpoint
from app.residuals.compute import compute_residual, preflight_residual
from app.residuals.dtypes import BY_NAME, DType
from app.residuals.exact import to_f32
from app.residuals.manifest import (
    MERGE_MANIFEST,
    RESIDUAL_MANIFEST,
    MergeManifest,
    ResidualManifest,
    SourceInfo,
    read_merge_manifest,
    read_residual_manifest,
)
from app.residuals.methods import get_method
from app.residuals.onepass import compute_and_apply
from app.residuals.progress import CancelFlag, ProgressCallback
from app.residuals.publish import check_output, staging_dir
from app.residuals.refs import ModelRef, ResolvedModel, resolve_ref
from app.residuals.sources import RunOptions, describe_source
from app.residuals.space import ensure_space, merged_bytes, reports_disk_full, residual_bytes
from app.store.factory import store_from_settings
from app.store.keys import merged_key, residual_key
from app.store.local import ArtifactInfo, LocalStore
from app.store.recovery import (
    Notice,
    manifest_or_none,
    moved_to,
    notify,
    pack_message,
    reuse_pack,
    with_pack,
)

DTYPES = {name: BY_NAME[name] for name in ("bfloat16", "float16", "float32")}


@dataclass(frozen=True)
class ComputeResult:
    key: str
    path: Path
    manifest: ResidualManifest
    created: bool


@dataclass(frozen=True)
class MergeResult:
    out: Path
    manifest: MergeManifest
    residual_key: str | None
    residual_created: bool


def open_store(
    store: LocalStore | Path | None = None, settings: Settings | None = None
) -> LocalStore:
    """The store at ``store``, or the configured ``REALIGN_MODELS_CACHE_DIR``."""
    if isinstance(store, LocalStore):
        return store
    return store_from_settings(settings or get_settings(), store)


def _options(
    device: str,
    progress: ProgressCallback | None,
    cancel: CancelFlag | None,
    max_shard_gb: float | None,
    hash_outputs: bool = True,
) -> RunOptions:
    settings = get_settings()
    shard = max_shard_gb if max_shard_gb is not None else settings.max_shard_gb
    rate = settings.max_read_mbps * 1e6 if settings.max_read_mbps else None
    return RunOptions(
        device=device,
        progress=progress,
        cancel=cancel,
        max_shard_bytes=int(shard * 1024**3),
        hash_outputs=hash_outputs,
        max_read_bps=rate,
    )


def resolve_model(ref: str, store: LocalStore | Path | None = None) -> Path:
    """The local directory of a model reference (Hub refs are downloaded, pinned)."""
    return _resolve(ref, open_store(store)).path


def _store_root() -> Path:
    """Where a full disk is reported when no store was given."""
    return get_settings().models_cache_dir


def _resolve(ref: str, store: LocalStore) -> ResolvedModel:
    trusted = get_settings().trusted_code_sha256  # admin allowlist of model code hashes
    return resolve_ref(ModelRef.parse(ref), store.root / "sources", trusted_code=trusted)


def _check_alpha(alpha: float) -> None:
    """Refuse a scale the fp32 math cannot hold, before any heavy work."""
    if not math.isfinite(to_f32(alpha)):  # the math scales in fp32
        raise InvalidParameterError(
            f"alpha must be a finite number within fp32 range (|alpha| < 3.4e38), not {alpha!r}"
        )


def _dtype(name: str) -> DType:
    try:
        return DTYPES[name]
    except KeyError:
        raise InvalidParameterError(
            f"dtype must be one of {', '.join(DTYPES)}, not {name!r}"
        ) from None


@reports_disk_full("store", fallback=_store_root)
def compute(
    base: str,
    instruct: str,
    *,
    dtype: str = "bfloat16",
    method: str = "task_arithmetic",
    store: LocalStore | Path | None = None,
    device: str = "cpu",
    progress: ProgressCallback | None = None,
    cancel: CancelFlag | None = None,
    max_shard_gb: float | None = None,
    notice: Notice | None = None,
    verify_pack: bool = True,
) -> ComputeResult:
    """Compute (or reuse) the residual pack of ``instruct - base`` in the store.

    A stored pack is verified before its key is handed on (``verify_pack=False``: only
    its manifest, for callers that read the pack next, which verifies it); a corrupt one
    is quarantined and rebuilt (``notice`` hears of it).

    Raises:
        RealignError subclasses for bad refs, incompatible models, cancellation.
    """
    st, torch_dtype = open_store(store), _dtype(dtype)
    get_method(method)
    ins, bas = _resolve(instruct, st), _resolve(base, st)
    with Checkpoint.open(ins.path) as i_ckpt, Checkpoint.open(bas.path) as b_ckpt:
        preflight_residual(i_ckpt, b_ckpt)  # headers only: refuse before hashing gigabytes
        i_src, b_src = describe_source(ins, st.hasher), describe_source(bas, st.hasher)
        key = residual_key(i_src.digest, b_src.digest, method=method, dtype=dtype)
        opts = _options(device, progress, cancel, max_shard_gb)
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
    return ComputeResult(key, path, manifest, created)


@contextlib.contextmanager
def _open_residual(residual: str, st: LocalStore) -> Iterator[Path]:
    """A pack directory given as a path, or a stored one by key (pinned meanwhile)."""
    candidate = Path(residual).expanduser()
    if (candidate / RESIDUAL_MANIFEST).is_file():
        yield candidate
        return
    if candidate.exists():
        raise CorruptCheckpointError(f"{candidate} is not a residual pack (no {RESIDUAL_MANIFEST})")
    with st.using(st.resolve(residual)) as path:
        yield path


@reports_disk_full("out", "store", fallback=_store_root)
def apply(
    residual: str,
    target: str,
    out: Path,
    *,
    alpha: float = 1.0,
    store: LocalStore | Path | None = None,
    device: str = "cpu",
    progress: ProgressCallback | None = None,
    cancel: CancelFlag | None = None,
    overwrite: bool = False,
    max_shard_gb: float | None = None,
    hash_outputs: bool = False,
    notice: Notice | None = None,
) -> MergeResult:
    """Apply a stored residual (key, key prefix or pack directory) to ``target``,
    writing a model directory at ``out`` atomically.

    The pack is verified as it is read; a stored pack found corrupt is quarantined
    and rebuilt from its sources (``notice`` is told), else the error says what to do.
    Nothing is written to ``out`` from a corrupt pack."""
    _check_alpha(alpha)
    st = open_store(store)
    check_output(out, overwrite=overwrite)
    tgt = _resolve(target, st)
    opts = _options(device, progress, cancel, max_shard_gb, hash_outputs)

    def use(pack_dir: Path) -> MergeResult:
        with Checkpoint.open(tgt.path) as t_ckpt:
            manifest, pack = open_pack(pack_dir)
            with pack:
                plan_apply(manifest, pack, t_ckpt, alpha)  # preflight before hashing the target
            t_src = describe_source(tgt, st.hasher)
            ensure_space([(out, merged_bytes(t_ckpt, pack, pack_dir / "assets"))])
            with staging_dir(out, overwrite=overwrite) as tmp:
                merged = apply_residual(
                    pack_dir, t_ckpt, tmp, target_src=t_src, alpha=alpha, opts=opts
                )
        return MergeResult(out, merged, manifest.key, False)

    return with_pack(st, residual, use, notice, opts)


@reports_disk_full("out", "store", fallback=_store_root)
def merge(
    base: str,
    instruct: str,
    target: str,
    out: Path,
    *,
    alpha: float = 1.0,
    dtype: str = "bfloat16",
    store: LocalStore | Path | None = None,
    device: str = "cpu",
    no_cache: bool = False,
    progress: ProgressCallback | None = None,
    cancel: CancelFlag | None = None,
    overwrite: bool = False,
    max_shard_gb: float | None = None,
    hash_outputs: bool = False,
    method: str = "task_arithmetic",
    notice: Notice | None = None,
) -> MergeResult:
    """``target + alpha * (instruct - base)`` into ``out``.

    With ``no_cache`` it runs one fused pass and stores nothing. Otherwise a stored
    residual is applied; when there is none yet, one pass over the three inputs
    writes the residual into the store and the merged model together.
    """
    _check_alpha(alpha)
    st, res_dtype = open_store(store), _dtype(dtype)
    get_method(method)
    check_output(out, overwrite=overwrite)
    refs = [_resolve(r, st) for r in (instruct, base, target)]
    with contextlib.ExitStack() as stack:
        ckpts = [stack.enter_context(Checkpoint.open(r.path)) for r in refs]
        i_c, b_c, t_c = ckpts
        plan_fused(i_c, b_c, t_c, alpha)  # preflight of the whole triple, headers only
        ensure_space([(out, merged_bytes(t_c, i_c, i_c.path))])  # before hashing or writing
        if not no_cache:
            i_src, b_src = (describe_source(r, st.hasher) for r in refs[:2])
            key = residual_key(i_src.digest, b_src.digest, method=method, dtype=dtype)
            if not st.exists(key):
                t_src = describe_source(refs[2], st.hasher)
                ensure_space(
                    [(st.root, residual_bytes(i_c, res_dtype)),
                     (out, merged_bytes(t_c, i_c, i_c.path))]
                )  # fmt: skip
                opts = _options(device, progress, cancel, max_shard_gb, hash_outputs)
                with staging_dir(out, overwrite=overwrite) as tmp:
                    merged, created = _residual_and_merge(
                        st, key, (i_c, b_c, t_c), (i_src, b_src, t_src), tmp,
                        dtype=res_dtype, alpha=alpha, method=method, opts=opts,
                    )  # fmt: skip
                return MergeResult(out, merged, key, created)
            stack.close()
            res = compute(
                base,
                instruct,
                dtype=dtype,
                method=method,
                store=st,
                device=device,
                progress=progress,
                cancel=cancel,
                max_shard_gb=max_shard_gb,
                notice=notice,
                verify_pack=False,  # the apply below verifies it as it reads
            )
            done = apply(
                res.key,
                target,
                out,
                alpha=alpha,
                store=st,
                device=device,
                progress=progress,
                cancel=cancel,
                overwrite=overwrite,
                max_shard_gb=max_shard_gb,
                hash_outputs=hash_outputs,
                notice=notice,
            )
            return MergeResult(out, done.manifest, res.key, res.created)
        srcs = [describe_source(r, st.hasher) for r in refs]
        opts = _options(device, progress, cancel, max_shard_gb, hash_outputs)
        with staging_dir(out, overwrite=overwrite) as tmp:
            merged = merge_fused(
                i_c,
                b_c,
                t_c,
                tmp,
                sources=(srcs[0], srcs[1], srcs[2]),
                alpha=alpha,
                method=method,
                opts=opts,
            )
    return MergeResult(out, merged, None, False)


def _store_first_merge(
    st: LocalStore,
    instruct: str,
    base: str,
    target: str,
    alpha: float,
    dtype: str,
    opts: RunOptions,
) -> StoredMerge | None:
    """``merge_to_store`` when the residual is not stored yet: one pass publishes the
    residual and the merged model (None when the residual exists: apply it instead)."""
    refs = [_resolve(r, st) for r in (instruct, base, target)]
    with contextlib.ExitStack() as stack:
        i_c, b_c, t_c = (stack.enter_context(Checkpoint.open(r.path)) for r in refs)
        plan_fused(i_c, b_c, t_c, alpha)
        i_src, b_src, t_src = (describe_source(r, st.hasher) for r in refs)
        key = residual_key(i_src.digest, b_src.digest, method="task_arithmetic", dtype=dtype)
        if st.exists(key):
            return None
        mkey = merged_key(key, t_src.digest, alpha=alpha)
        if not st.exists(mkey, "merged"):  # free space for pack and model, before writing
            need = residual_bytes(i_c, _dtype(dtype)) + merged_bytes(t_c, i_c, i_c.path)
            ensure_space([(st.root, need)])
        built: list[bool] = []

        def build(tmp: Path) -> None:
            _, created = _residual_and_merge(
                st, key, (i_c, b_c, t_c), (i_src, b_src, t_src), tmp,
                dtype=_dtype(dtype), alpha=alpha, method="task_arithmetic", opts=opts,
            )  # fmt: skip
            built.append(created)

        created = st.get_or_build(mkey, build, kind="merged", keep=(key,))
    path = st.path(mkey, "merged")
    merged = read_merge_manifest(path)
    return StoredMerge(mkey, path, merged, key, bool(built) and built[0], created)


def _residual_and_merge(
    st: LocalStore,
    key: str,
    ckpts: tuple[Checkpoint, Checkpoint, Checkpoint],
    sources: tuple[SourceInfo, SourceInfo, SourceInfo],
    out_dir: Path,
    *,
    dtype: DType,
    alpha: float,
    method: str,
    opts: RunOptions,
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
            method=method, key=key, opts=opts,
        )  # fmt: skip
        made.append(merged)

    if st.get_or_build(key, build):
        return made[0], True
    with st.using(key) as pack_dir:
        merged = apply_residual(
            pack_dir, ckpts[2], out_dir, target_src=sources[2], alpha=alpha, opts=opts
        )
    return merged, False


def inspect(ref: str, store: LocalStore | Path | None = None) -> ResidualManifest | MergeManifest:
    """The manifest of a residual (key or pack dir) or of a merged model directory."""
    path = Path(ref).expanduser()
    if (path / MERGE_MANIFEST).is_file():
        return read_merge_manifest(path)
    if (path / RESIDUAL_MANIFEST).is_file():
        return read_residual_manifest(path)
    if path.exists():
        raise ArtifactNotFoundError(f"{path} is neither a residual pack nor a Realign merge")
    st = open_store(store)
    return read_residual_manifest(st.path(st.resolve(ref)))


def verify(key: str, store: LocalStore | Path | None = None) -> ResidualManifest:
    """Check every file of a stored residual against its recorded sha256; a corrupt
    one is quarantined (moved aside, kept) and the error says how to compute it again.

    Raises:
        ArtifactCorruptError: a file is missing or does not match.
    """
    st = open_store(store)
    full = st.resolve(key)
    try:
        return st.verify(full)
    except ArtifactCorruptError as exc:
        manifest = manifest_or_none(st.path(full))
        moved = st.quarantine(full, "residuals", str(exc))
        raise ArtifactCorruptError(
            pack_message(full, exc, moved, manifest), file=exc.file
        ) from None


def list_artifacts(store: LocalStore | Path | None = None) -> list[ArtifactInfo]:
    """Everything in the store, oldest use first."""
    return sorted(open_store(store).artifacts(), key=lambda a: a.last_used)


def remove(key: str, store: LocalStore | Path | None = None) -> str:
    """Delete a stored residual (refused while in use) and the merged models made from
    it (a residual removed because it was bad leaves nothing made from it to reuse);
    returns the full key."""
    st = open_store(store)
    full = st.resolve(key)
    st.remove(full)
    for item in st.artifacts("merged"):
        with contextlib.suppress(OSError, ValueError, ArtifactNotFoundError, ArtifactInUseError):
            made = read_merge_manifest(item.path)
            if made.residual_key == full:
                st.remove(item.key, "merged")
    return full


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
    *,
    target: str,
    base: str | None = None,
    instruct: str | None = None,
    residual: str | None = None,
    alpha: float = 1.0,
    store: LocalStore | Path | None = None,
) -> None:
    """Every check of a merge request that needs no tensor data (configs, tokenizers,
    safetensors headers): refs resolve, families match, names and shapes line up.

    Raises:
        RealignError subclasses describing the first problem found.
    """
    _check_alpha(alpha)
    st = open_store(store)
    tgt = _resolve(target, st)
    with Checkpoint.open(tgt.path) as t_ckpt:
        if residual is not None:
            with _open_residual(residual, st) as pack_dir:
                try:
                    manifest, pack = open_pack(pack_dir)
                except ArtifactCorruptError:
                    return  # the job quarantines and rebuilds it, or says what to do
                with pack:
                    plan_apply(manifest, pack, t_ckpt, alpha)
            return
        if base is None or instruct is None:
            raise InvalidParameterError("give either a residual key or both base and instruct")
        ins, bas = _resolve(instruct, st), _resolve(base, st)
        with Checkpoint.open(ins.path) as i_ckpt, Checkpoint.open(bas.path) as b_ckpt:
            plan_fused(i_ckpt, b_ckpt, t_ckpt, alpha)


@reports_disk_full("store", fallback=_store_root)
def merge_to_store(
    *,
    target: str,
    base: str | None = None,
    instruct: str | None = None,
    residual: str | None = None,
    alpha: float = 1.0,
    dtype: str = "bfloat16",
    store: LocalStore | Path | None = None,
    device: str = "cpu",
    progress: ProgressCallback | None = None,
    cancel: CancelFlag | None = None,
    notice: Notice | None = None,
) -> StoredMerge:
    """Compute or reuse the residual, then publish ``target + alpha * R`` as a
    content-addressed merged model in the store (``merged/<key>``); idempotent.

    Every stored input is verified: a pack as it is read, a merged model that is
    reused by hashing its shards before it is handed out. A corrupt one is
    quarantined and rebuilt from its sources, and ``notice`` hears of it.

    Raises:
        ArtifactCorruptError: a corrupt pack whose sources are not available.
    """
    _check_alpha(alpha)
    st = open_store(store)

    def again() -> StoredMerge:
        return merge_to_store(
            target=target, base=base, instruct=instruct, residual=residual, alpha=alpha,
            dtype=dtype, store=st, device=device, progress=progress, cancel=cancel,
            notice=notice,
        )  # fmt: skip

    created_residual = False
    opts = _options(device, progress, cancel, None, hash_outputs=True)
    res_key = residual
    if res_key is None:
        if base is None or instruct is None:
            raise InvalidParameterError("give either a residual key or both base and instruct")
        first = _store_first_merge(st, instruct, base, target, alpha, dtype, opts)
        if first is not None:
            return _checked_reuse(st, first, again, notice)
        res = compute(
            base, instruct, dtype=dtype, store=st, device=device, progress=progress,
            cancel=cancel, notice=notice, verify_pack=False,
        )  # fmt: skip
        res_key, created_residual = res.key, res.created
    tgt = _resolve(target, st)

    def use(pack_dir: Path) -> tuple[str, bool, str]:
        with Checkpoint.open(tgt.path) as t_ckpt:
            manifest, pack = open_pack(pack_dir)
            with pack:
                plan_apply(manifest, pack, t_ckpt, alpha)
            t_src = describe_source(tgt, st.hasher)
            key = merged_key(manifest.key or pack_dir.name, t_src.digest, alpha=alpha)
            if not st.exists(key, "merged"):  # free space for the model, before writing
                ensure_space([(st.root, merged_bytes(t_ckpt, pack, pack_dir / "assets"))])
            created = st.get_or_build(
                key,
                lambda tmp: apply_residual(
                    pack_dir, t_ckpt, tmp, target_src=t_src, alpha=alpha, opts=opts
                ),
                kind="merged",
            )
        return key, created, manifest.key or res_key

    key, created, rkey = with_pack(st, res_key, use, notice, opts)
    path = st.path(key, "merged")
    merged = read_merge_manifest(path)
    done = StoredMerge(key, path, merged, rkey, created_residual, created)
    return _checked_reuse(st, done, again, notice)


def _checked_reuse(
    st: LocalStore, done: StoredMerge, again: Callable[[], StoredMerge], notice: Notice | None
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
            f"merged model {done.key}: {exc.file} did not match its recorded sha256; it was "
            f"{moved_to(moved)} and is being built again",
        )
    return again()
