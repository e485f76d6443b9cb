"""Recovery from corrupt stored artifacts: a pack read by a pipeline is verified as it
is read; one found corrupt is quarantined (moved aside, kept) and rebuilt from the
sources its manifest records, or the error says what to do."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from app.core.errors import (
    ArtifactCorruptError,
    CorruptCheckpointError,
    IncompatibleModelsError,
    RealignError,
    UnrelatedModelsError,
)
from app.residuals.checkpoint import Checkpoint
from app.residuals.compute import compute_residual
from app.residuals.dtypes import PACK_DTYPES
from app.residuals.integrity import mismatch_message
from app.residuals.manifest import RESIDUAL_MANIFEST, ResidualManifest, read_residual_manifest
from app.residuals.refs import ResolvedModel
from app.residuals.sources import RunOptions, describe_source
from app.store.base import Store
from app.store.inputs import resolve_input
from app.store.keys import residual_key
from app.store.quarantine import QUARANTINE

Notice = Callable[[str], object]  # told when a corrupt artifact was rebuilt
T = TypeVar("T")
log = logging.getLogger(__name__)


def _resolve(ref: str, st: Store) -> ResolvedModel:
    return resolve_input(ref, st)


def _stored_key(residual: str, st: Store) -> str | None:
    """The full store key of ``residual``, or None when it names a pack directory."""
    if (Path(residual).expanduser() / RESIDUAL_MANIFEST).is_file():
        return None
    return st.resolve(residual)


def notify(notice: Notice | None, message: str) -> None:
    """Log ``message`` (a warning: an operator wants to know) and tell ``notice``."""
    log.warning("%s", message)
    if notice is not None:
        notice(message)


def with_pack(
    st: Store,
    residual: str,
    use: Callable[[Path], T],
    notice: Notice | None,
    opts: RunOptions | None = None,
) -> T:
    """Run ``use`` on a residual pack; ``use`` reads the pack, which verifies it.

    A stored pack found corrupt is quarantined, rebuilt from its base and instruct
    when they are at hand (then ``use`` runs again and ``notice`` hears of it), or the
    error says what to do. ``use`` must publish nothing when it raises.
    """
    key = _stored_key(residual, st)
    if key is None:
        try:
            return use(Path(residual).expanduser())
        except ArtifactCorruptError as exc:
            raise ArtifactCorruptError(
                f"{exc}; nothing was written — copy the pack again or compute it anew "
                "(`realign compute`)",
                file=exc.file,
            ) from None
    try:
        with st.using(key) as pack_dir:
            return use(pack_dir)
    except UnrelatedModelsError:
        raise  # measured on the base and target, not the pack: no damage to it causes it
    except (ArtifactCorruptError, CorruptCheckpointError, IncompatibleModelsError) as exc:
        bad = _corruption(st, key, exc)
        if bad is None:
            raise
    _recover_pack(st, key, bad, notice, opts)
    with st.using(key) as pack_dir:
        return use(pack_dir)


def reuse_pack(
    st: Store,
    key: str,
    build: Callable[[Path], object],
    notice: Notice | None,
    *,
    full: bool = True,
) -> ResidualManifest:
    """The manifest of stored pack ``key``, reused by a caller that has its sources at
    hand (``build`` makes it again). ``full``: every file is verified, for a caller that
    hands the key on; else only the manifest's seal, for one that reads the pack next
    (the read verifies the rest). A corrupt pack is quarantined and rebuilt."""
    try:
        if full:
            return st.verify(key)
        with st.using(key) as path:  # fetched into this node's cache when built elsewhere
            return read_residual_manifest(path)
    except ArtifactCorruptError as exc:
        moved = st.quarantine(key, "residuals", str(exc))
        st.get_or_build(key, build)
        notify(
            notice,
            f"residual {key}: {exc.file} did not match its recorded checksum; the pack was "
            f"{moved_to(moved)} and rebuilt from its base and instruct",
        )
        return read_residual_manifest(st.path(key))


def verify_pack(
    st: Store, key: str, notice: Notice | None, opts: RunOptions | None = None
) -> ResidualManifest:
    """Verify stored pack ``key`` in full before something other than a reading
    pipeline (an engine loading it) uses it; a corrupt one is quarantined and rebuilt
    from the sources its manifest records, or the error says what to do."""
    try:
        return st.verify(key)
    except ArtifactCorruptError as exc:
        _recover_pack(st, key, exc, notice, opts)
        return read_residual_manifest(st.path(key))


def _corruption(st: Store, key: str, exc: RealignError) -> ArtifactCorruptError | None:
    """``exc`` as an integrity error of pack ``key``; a malformed header (or shapes
    that make no sense) gets a full check first, since a flipped byte can cause it."""
    if isinstance(exc, ArtifactCorruptError):
        return exc
    try:
        st.verify(key)
    except ArtifactCorruptError as found:
        return found
    except (RealignError, OSError, ValueError):
        return None
    return None


def pack_message(
    key: str, exc: ArtifactCorruptError, moved: Path | None, m: ResidualManifest | None
) -> str:
    """What `realign verify`, `realign apply` and a job say about a corrupt pack that
    was not rebuilt: which file, where the pack went, the command that makes it again."""
    where = moved_to(moved)
    redo = (
        f"`realign compute --base {m.base.ref} --instruct {m.instruct.ref} --dtype {m.dtype}`"
        if m
        else "`realign compute` from its base and instruct"
    )
    return f"{mismatch_message(key, exc.file)}; the pack was {where}; compute it again: {redo}"


def moved_to(moved: Path | None) -> str:
    """Where a quarantined artifact went, in words."""
    return f"moved aside to {moved}" if moved else "moved aside by another process"


def _recover_pack(
    st: Store,
    key: str,
    exc: ArtifactCorruptError,
    notice: Notice | None,
    opts: RunOptions | None,
) -> None:
    """Quarantine corrupt pack ``key`` and rebuild it from its sources.

    Raises:
        ArtifactCorruptError: the sources are not available (or no longer give ``key``).
    """
    manifest = _pack_manifest(st, key)
    moved = st.quarantine(key, "residuals", str(exc))
    if manifest is None or not _rebuild_pack(st, key, manifest, opts or RunOptions()):
        raise ArtifactCorruptError(pack_message(key, exc, moved, manifest), file=exc.file)
    notify(
        notice,
        f"residual {key}: {exc.file} did not match its recorded checksum; the pack was "
        f"{moved_to(moved)} and rebuilt from {manifest.instruct.ref} and {manifest.base.ref}",
    )


def _pack_manifest(st: Store, key: str) -> ResidualManifest | None:
    """The manifest of pack ``key``, or of its latest quarantined copy (when another
    process moved it aside first)."""
    quarantined = sorted(st.root.glob(f"{QUARANTINE}/{key}.*"), reverse=True)
    for where in (st.path(key), *quarantined):
        if (found := manifest_or_none(where)) is not None:
            return found
    return None


def manifest_or_none(pack_dir: Path) -> ResidualManifest | None:
    """A pack's manifest, unchecked when its seal is broken: it only names the sources
    to rebuild from, and a rebuild is kept only when they give the pack's key again."""
    for sealed in (True, False):
        try:
            return read_residual_manifest(pack_dir, sealed=sealed)
        except (OSError, ValueError):
            continue
    return None


def _rebuild_pack(st: Store, key: str, m: ResidualManifest, opts: RunOptions) -> bool:
    """Build pack ``key`` again from the sources its manifest records; False when they
    are gone or changed (they would give another key)."""
    try:
        ins, bas = _resolve(m.instruct.ref, st), _resolve(m.base.ref, st)
        with Checkpoint.open(ins.path) as i_ckpt, Checkpoint.open(bas.path) as b_ckpt:
            i_src, b_src = describe_source(ins, st.hasher), describe_source(bas, st.hasher)
            if residual_key(i_src.digest, b_src.digest, method=m.method, dtype=m.dtype) != key:
                return False
            st.get_or_build(
                key,
                lambda tmp: compute_residual(
                    i_ckpt, b_ckpt, tmp, instruct_src=i_src, base_src=b_src,
                    dtype=PACK_DTYPES[m.dtype], method=m.method, key=key, opts=opts,
                ),
            )  # fmt: skip
    except (RealignError, OSError) as exc:
        log.warning("residual %s cannot be rebuilt: %s", key, exc)
        return False
    return True
