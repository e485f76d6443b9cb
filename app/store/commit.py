"""Publishing into a bucket: a builder's own upload prefix, then a conditional commit.

A builder uploads under ``<kind>/<key>/.build-<fence>-<id>/`` (a prefix no other
builder writes) and commits by writing ``<kind>/<key>/.realign-commit.json`` only if
none exists (``PUT`` with ``If-None-Match: *``). Of two builders of one key exactly
one publishes, whatever their leases say; the other deletes only its own uploads.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from app.core.errors import StagingLostError, StoreUnavailableError
from app.residuals.hashing import FileHasher
from app.store.base import Kind
from app.store.remote import BUILD, COMMIT, Bucket
from app.store.s3 import call, is_missing, relative_files, upload_file

_CONFLICT_RETRIES = 5


def publish(
    bucket: Bucket,
    src: Path,
    key: str,
    kind: Kind,
    hasher: FileHasher,
    fence: int,
    still_held: Callable[[], None] = lambda: None,
) -> bool:
    """Upload ``src`` under this builder's own prefix, then commit it: write the marker
    only if ``key`` has none.

    Args:
        fence: the build lock's fencing token, recorded in the prefix and the marker.
        still_held: raises when the build lock was lost; called before the upload and
            right before the commit.

    Returns:
        True when this commit published ``key``; False when another builder's came
        first (its entry is untouched; this builder's uploads are deleted).

    Raises:
        BuildLockLostError: from ``still_held``; this builder's uploads are deleted.
        StoreUnavailableError: the store failed; nothing of this builder is visible
            unless its commit went through unanswered.
    """
    data = build_prefix(fence)
    rels = relative_files(src)
    if not rels:  # a swept staging directory: never an empty marker
        raise StagingLostError(f"{kind}/{key}: {src} holds no files; nothing was published")
    hashes = hasher.sha256_many(src / r for r in rels)
    files = {r: ((src / r).stat().st_size, hashes[src / r]) for r in rels}
    own = bucket.name(kind, key, data) + "/"
    try:
        still_held()
        with ThreadPoolExecutor(max_workers=4) as pool:
            list(pool.map(lambda r: upload_file(
                bucket.cfg, src / r, bucket.bucket, own + r), rels))  # fmt: skip
        still_held()
    except BaseException:
        with contextlib.suppress(Exception):  # else the sweep removes them a day later
            bucket.delete_prefix(own)
        raise
    return commit_files(bucket, key, kind, data, files, fence)


def build_prefix(fence: int) -> str:
    """A new builder's own upload prefix (under ``<kind>/<key>/``)."""
    return f"{BUILD}{fence}-{uuid.uuid4().hex[:12]}"


def commit_files(
    bucket: Bucket,
    key: str,
    kind: Kind,
    data: str,
    files: dict[str, tuple[int, str]],
    fence: int,
) -> bool:
    """Commit the ``files`` ((size, sha256) by relative path) uploaded under the
    builder prefix ``data``: write the marker only if ``key`` has none; a builder that
    lost deletes its uploads. Returns whether this commit published ``key``."""
    marker = {
        "key": key, "kind": kind, "created": time.time(), "fence": fence, "data": data,
        "builder": f"{socket.gethostname()}:{os.getpid()}",
        "files": {r: {"size": size, "sha256": sha} for r, (size, sha) in files.items()},
    }  # fmt: skip
    # A commit that fails with its outcome unknown leaves the uploads in place: the
    # marker may name them; if it does not, the sweep removes them.
    won = commit(bucket, bucket.name(kind, key, COMMIT), json.dumps(marker).encode())
    if not won:
        bucket.delete_prefix(bucket.name(kind, key, data) + "/")
    return won


def commit(bucket: Bucket, name: str, body: bytes) -> bool:
    """Write ``body`` at ``name`` unless an object is there; False when one is.

    A commit whose answer was lost (a timeout, then a retry told "exists") counts as
    won when the object there is this one.

    Raises:
        StoreUnavailableError: the store failed, or does not support conditional writes.
    """
    from botocore.exceptions import ClientError

    client = bucket.cfg.client()

    def put() -> bool:
        for attempt in range(_CONFLICT_RETRIES):
            try:
                client.put_object(Bucket=bucket.bucket, Key=name, Body=body, IfNoneMatch="*")
                return True
            except ClientError as exc:
                code = exc.response.get("Error", {}).get("Code")
                if code in ("PreconditionFailed", "412"):
                    return False
                if code == "NotImplemented":
                    raise StoreUnavailableError(
                        f"the object store at {bucket.url()} does not support conditional "
                        "writes (PUT with If-None-Match: *), which the commit needs so that "
                        "only one builder publishes a key: use AWS S3, MinIO or another "
                        "endpoint that supports them"
                    ) from None
                if code not in ("ConditionalRequestConflict", "409"):
                    raise
            time.sleep(0.1 * 2**attempt)  # another conditional write is in flight
        return False

    try:
        won = call(f"commit of s3://{bucket.bucket}/{name}", put)
    except StoreUnavailableError:
        if not _holds(bucket, name, body):
            raise
        return True
    return won or _holds(bucket, name, body)


def _holds(bucket: Bucket, name: str, body: bytes) -> bool:
    """Whether the object at ``name`` holds ``body``."""
    from botocore.exceptions import ClientError

    client = bucket.cfg.client()

    def get() -> bool:
        try:
            return bool(client.get_object(Bucket=bucket.bucket, Key=name)["Body"].read() == body)
        except ClientError as exc:
            if is_missing(exc):
                return False
            raise

    return call(f"read of s3://{bucket.bucket}/{name}", get)
