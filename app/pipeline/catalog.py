"""What is in the store: inspect, verify, list, remove."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import TYPE_CHECKING

from app.core.errors import ArtifactCorruptError, ArtifactInUseError, ArtifactNotFoundError
from app.residuals.manifest import (
    MERGE_MANIFEST,
    RESIDUAL_MANIFEST,
    MergeManifest,
    ResidualManifest,
    parse_sealed,
    read_merge_manifest,
    read_residual_manifest,
)
from app.store.base import ArtifactInfo, Kind, Store
from app.store.recovery import manifest_or_none, pack_message

if TYPE_CHECKING:
    from app.evals.stored import StoredScore


def inspect(ref: str, st: Store) -> ResidualManifest | MergeManifest:
    """The manifest of a residual (key or pack dir) or of a merged model (key or dir)."""
    path = Path(ref).expanduser()
    if (path / MERGE_MANIFEST).is_file():
        return read_merge_manifest(path)
    if (path / RESIDUAL_MANIFEST).is_file():
        return read_residual_manifest(path)
    if path.exists():
        raise ArtifactNotFoundError(f"{path} is neither a residual pack nor a Realign merge")
    kind, key = _resolve(ref, st)
    if kind == "merged":  # its manifest alone (a bucket's copy is not downloaded whole)
        raw = st.read_text(key, MERGE_MANIFEST, "merged").encode()
        return MergeManifest.model_validate(parse_sealed(raw, f"merged {key}", MERGE_MANIFEST))
    with st.using(key) as pack:
        return read_residual_manifest(pack)


def evaluations(ref: str, st: Store) -> list[StoredScore]:
    """The evaluation scores stored for the merged model ``ref`` names (its key, a key
    prefix, or its directory in the store), oldest first; [] for anything else."""
    from app.evals.stored import scores_of

    path = Path(ref).expanduser()
    if path.exists():  # a merged model's directory in the store is named by its key
        same = path.resolve() == st.path(path.name, "merged").resolve()
        return scores_of(st, path.name) if same else []
    kind, key = _resolve(ref, st)
    return scores_of(st, key) if kind == "merged" else []


def _resolve(prefix: str, st: Store) -> tuple[Kind, str]:
    """The residual, else the merged model, whose key starts with ``prefix``.

    Raises:
        ArtifactNotFoundError: neither; AmbiguousKeyError: several of one kind.
    """
    try:
        return "residuals", st.resolve(prefix)
    except ArtifactNotFoundError:
        pass
    try:
        return "merged", st.resolve(prefix, "merged")
    except ArtifactNotFoundError:
        raise ArtifactNotFoundError(
            f"no residual or merged model with key {prefix!r} in the store; `realign ls` lists them"
        ) from None


def verify(key: str, st: Store) -> ResidualManifest:
    """Check every file of a stored residual; a corrupt one is quarantined and the
    error says how to compute it again (ArtifactCorruptError)."""
    full = st.resolve(key)
    try:
        return st.verify(full)
    except ArtifactCorruptError as exc:
        manifest = manifest_or_none(st.path(full))
        moved = st.quarantine(full, "residuals", str(exc))
        if st.exists(full):  # only this node's copy was bad; the store's is whole
            with contextlib.suppress(ArtifactCorruptError):
                return st.verify(full)
        if manifest is None and moved is not None:
            manifest = manifest_or_none(moved)  # a corrupt download, kept aside
        raise ArtifactCorruptError(
            pack_message(full, exc, moved, manifest), file=exc.file
        ) from None


def list_artifacts(st: Store) -> list[ArtifactInfo]:
    """Everything in the store, oldest use first."""
    return sorted(st.artifacts(), key=lambda a: a.last_used)


def remove(key: str, st: Store) -> str:
    """Delete a stored residual (refused while in use) and the merged models made from
    it; returns the full key."""
    full = st.resolve(key)
    st.remove(full)
    for item in st.artifacts("merged"):
        with contextlib.suppress(OSError, ValueError, ArtifactNotFoundError, ArtifactInUseError):
            text = st.read_text(item.key, MERGE_MANIFEST, "merged")
            made = MergeManifest.model_validate_json(text)
            if made.residual_key == full or any(r.key == full for r in made.residuals):
                st.remove(item.key, "merged")
    return full
