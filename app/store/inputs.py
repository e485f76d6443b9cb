"""Input models for the verbs: local directories, Hub refs and ``s3://`` refs.

An ``s3://bucket/prefix`` model is downloaded into ``sources/s3/`` of the node's
store directory (once per listing of its objects) and identified by the sha256 of
its files, like any input; its pinned form ``s3://bucket/prefix@sha256:<digest>``
(recorded on a job) refuses objects that changed since.

A Hub ref is pinned and preflighted without its weights (configs, tokenizer files and
safetensors headers only, see :mod:`app.residuals.hub`); :func:`download_bytes` says
what its download will write, for a free-space check before it.
"""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import os
import shutil
import time
import uuid
from collections.abc import Collection, Iterable
from pathlib import Path

from app.core.errors import ModelNotFoundError
from app.residuals.checkpoint import Checkpoint
from app.residuals.hub import fetch_small, inspect_hub, list_hub, missing_bytes
from app.residuals.refs import (
    HUB_PATTERNS,
    ModelRef,
    ResolvedModel,
    refuse_pickle_only,
    resolve_ref,
)
from app.residuals.remote_code import CODE_SUFFIX, check_remote_code
from app.residuals.sources import describe_source
from app.residuals.space import ensure_space
from app.store.base import Store
from app.store.s3 import download_file, list_objects, split_url

Need = tuple[Path, int]  # (where, bytes to write there)


def resolve_input(text: str, store: Store, trusted_code: Collection[str] = ()) -> ResolvedModel:
    """A model reference made local (Hub and object store refs downloaded, pinned).

    Raises:
        InvalidRefError, ModelNotFoundError, UnsafeCheckpointError, RemoteCodeError,
        StoreUnavailableError.
    """
    ref = ModelRef.parse(text)
    if ref.kind != "s3":
        return resolve_ref(ref, hub_cache(store), trusted_code=trusted_code)
    return _fetch_s3(ref, store, trusted_code)


def pin_input(text: str, store: Store, trusted_code: Collection[str] = ()) -> str:
    """The reference pinned: a Hub ref to its commit (configs fetched and checked for
    code, no weights), an ``s3://`` ref to its content (downloaded); others as given.

    Raises:
        as :func:`resolve_input`.
    """
    ref = ModelRef.parse(text)
    if ref.kind == "hf":
        listing = list_hub(ref)
        fetch_small(listing, hub_cache(store), None, trusted_code)
        return listing.ref
    if ref.kind == "s3":
        return resolve_input(text, store, trusted_code).ref
    return text


def inspect_input(text: str, store: Store, trusted_code: Collection[str] = ()) -> Checkpoint:
    """The model of a reference, headers only, to preflight (a Hub ref's weights are
    not downloaded: their headers are read remotely). Close it after use.

    Raises:
        as :func:`resolve_input`, and CorruptCheckpointError.
    """
    ref = ModelRef.parse(text)
    if ref.kind == "hf":
        return inspect_hub(ref, hub_cache(store), None, trusted_code)
    return Checkpoint.open(resolve_input(text, store, trusted_code).path)


def download_bytes(texts: Collection[str], store: Store) -> int:
    """Bytes resolving ``texts`` will download into the Hub cache (files not there yet)."""
    total = 0
    for text in texts:
        ref = ModelRef.parse(text)
        if ref.kind == "hf":
            total += missing_bytes(list_hub(ref), hub_cache(store))
    return total


def check_download_room(store: Store, download: int, outputs: Iterable[Need]) -> None:
    """Refuse a Hub download of ``download`` bytes unless the Hub cache's file system
    takes it and each destination of ``outputs`` (path, bytes the caller will write
    there) takes those, + 10 % (on one file system: their sum).

    Raises:
        InsufficientStorageError: naming the paths and the bytes needed and free.
    """
    ensure_space([(hub_cache(store), download), *outputs])


def hub_cache(store: Store) -> Path:
    """Where Hub downloads go: ``sources/`` of the store's local directory."""
    return store.root / "sources"


def _fetch_s3(ref: ModelRef, store: Store, trusted_code: Collection[str]) -> ResolvedModel:
    bucket, prefix = split_url(f"s3://{ref.repo}")
    found = {o["Key"][len(prefix) + 1 :]: o for o in list_objects(store.s3, bucket, prefix + "/")}
    refuse_pickle_only(list(found), f"s3://{bucket}/{prefix}")
    objects = {rel: o for rel, o in found.items() if _wanted(rel)}
    if not objects:
        raise ModelNotFoundError(f"s3://{bucket}/{prefix}: no model files there")
    listing = hashlib.sha256(
        "".join(
            f"{k}\0{o['Size']}\0{o.get('ETag', '')}\n" for k, o in sorted(objects.items())
        ).encode()
    ).hexdigest()
    dest = store.root / "sources" / "s3" / listing[:32]
    _sweep_parts(dest.parent)
    if not dest.is_dir():
        part = dest.with_name(f"{dest.name}.{uuid.uuid4().hex[:8]}.part")
        try:
            for rel, obj in objects.items():
                size, etag = int(obj["Size"]), obj.get("ETag")
                download_file(store.s3, bucket, obj["Key"], part / rel, size, None, etag)
            with contextlib.suppress(OSError):  # another process got there first: same objects
                os.replace(part, dest)
        finally:
            shutil.rmtree(part, ignore_errors=True)
    digest = describe_source(ResolvedModel(ref=str(ref), path=dest), store.hasher).digest
    if ref.revision and ref.revision != f"sha256:{digest}":
        raise ModelNotFoundError(
            f"{ref}: the objects under s3://{bucket}/{prefix} changed since this reference "
            f"was pinned (content is now sha256:{digest[:12]}…); submit the job again"
        )
    pinned = f"s3://{bucket}/{prefix}@sha256:{digest}"
    check_remote_code(dest, pinned, trusted_code)
    return ResolvedModel(ref=pinned, path=dest, commit=f"sha256:{digest}")


PART_TTL_S = 6 * 3600.0
"""A download directory nothing wrote to for this long was left by a killed process."""


def _sweep_parts(parent: Path, now: float | None = None) -> list[Path]:
    """Remove the ``.part`` download directories of processes that died mid-download
    (SIGKILL, OOM): nothing was written in them for :data:`PART_TTL_S`."""
    now = time.time() if now is None else now
    removed = []
    for part in parent.glob("*.part") if parent.is_dir() else []:
        with contextlib.suppress(OSError):
            newest = max([part.stat().st_mtime] + [f.stat().st_mtime for f in part.rglob("*")])
            if newest + PART_TTL_S < now:
                shutil.rmtree(part, ignore_errors=True)
                removed.append(part)
    return removed


def _wanted(rel: str) -> bool:
    """Files a merge reads (as from the Hub) and code (to hash it, never run)."""
    if not rel or rel.endswith("/"):
        return False
    name = rel.rsplit("/", 1)[-1]
    return any(fnmatch.fnmatch(name, p) for p in (*HUB_PATTERNS, f"*{CODE_SUFFIX}"))
