"""What is in the store: inspect, verify, list, remove."""

from __future__ import annotations

import contextlib
from pathlib import Path

from app.core.errors import ArtifactCorruptError, ArtifactInUseError, ArtifactNotFoundError
from app.residuals.manifest import (
    MERGE_MANIFEST,
    RESIDUAL_MANIFEST,
    MergeManifest,
    ResidualManifest,
    read_merge_manifest,
    read_residual_manifest,
)
from app.store.base import ArtifactInfo, Store
from app.store.recovery import manifest_or_none, pack_message


def inspect(ref: str, st: Store) -> ResidualManifest | MergeManifest:
    """The manifest of a residual (key or pack dir) or of a merged model directory."""
    path = Path(ref).expanduser()
    if (path / MERGE_MANIFEST).is_file():
        return read_merge_manifest(path)
    if (path / RESIDUAL_MANIFEST).is_file():
        return read_residual_manifest(path)
    if path.exists():
        raise ArtifactNotFoundError(f"{path} is neither a residual pack nor a Realign merge")
    with st.using(st.resolve(ref)) as pack:
        return read_residual_manifest(pack)


def verify(key: str, st: Store) -> ResidualManifest:
    """Check every file of a stored residual; a corrupt one is quarantined and the
    error says how to compute it again (ArtifactCorruptError)."""
    full = st.resolve(key)
    try:
        return st.verify(full)
    except ArtifactCorruptError as exc:
        manifest = manifest_or_none(st.path(full))
        moved = st.quarantine(full, "residuals", str(exc))
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
