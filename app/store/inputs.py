"""Input models for the verbs: local directories, Hub refs and ``s3://`` refs.

An ``s3://bucket/prefix`` model is downloaded into ``sources/s3/`` of the node's
store directory (once per listing of its objects) and identified by the sha256 of
its files, like any input; its pinned form ``s3://bucket/prefix@sha256:<digest>``
(recorded on a job) refuses objects that changed since.
"""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import os
import shutil
import uuid
from collections.abc import Collection

from app.core.errors import ModelNotFoundError
from app.residuals.refs import (
    HUB_PATTERNS,
    ModelRef,
    ResolvedModel,
    refuse_pickle_only,
    resolve_ref,
)
from app.residuals.remote_code import CODE_SUFFIX, check_remote_code
from app.residuals.sources import describe_source
from app.store.base import Store
from app.store.s3 import download_file, list_objects, split_url


def resolve_input(text: str, store: Store, trusted_code: Collection[str] = ()) -> ResolvedModel:
    """A model reference made local (Hub and object store refs downloaded, pinned).

    Raises:
        InvalidRefError, ModelNotFoundError, UnsafeCheckpointError, RemoteCodeError,
        StoreUnavailableError.
    """
    ref = ModelRef.parse(text)
    if ref.kind != "s3":
        return resolve_ref(ref, store.root / "sources", trusted_code=trusted_code)
    return _fetch_s3(ref, store, trusted_code)


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
    if not dest.is_dir():
        part = dest.with_name(f"{dest.name}.{uuid.uuid4().hex[:8]}.part")
        try:
            for rel, obj in objects.items():
                download_file(store.s3, bucket, obj["Key"], part / rel, int(obj["Size"]), None)
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


def _wanted(rel: str) -> bool:
    """Files a merge reads (as from the Hub) and code (to hash it, never run)."""
    if not rel or rel.endswith("/"):
        return False
    name = rel.rsplit("/", 1)[-1]
    return any(fnmatch.fnmatch(name, p) for p in (*HUB_PATTERNS, f"*{CODE_SUFFIX}"))
