"""The bucket layout of an object store and its publish / fetch steps.

``<prefix>/<kind>/<key>/<file>`` hold an artifact's files and
``<prefix>/<kind>/<key>/.realign-commit.json`` its commit marker, written last:
the size and sha256 of every file. Readers see only artifacts with a marker. A
builder uploads to ``<prefix>/.staging/<key>.<token>/`` (a name no other builder
picks), copies into place, writes the marker, then deletes its staging objects;
staging left by a builder that died is ignored by readers and swept after
``STAGING_TTL_S`` (a bucket lifecycle rule that aborts incomplete multipart uploads
is advised too).
"""

from __future__ import annotations

import functools
import hashlib
import json
import socket
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from app.core.errors import ArtifactCorruptError, ArtifactNotFoundError
from app.residuals.hashing import FileHasher
from app.store.base import Kind
from app.store.s3 import (
    S3Config,
    call,
    copy_object,
    download_file,
    is_missing,
    list_objects,
    relative_files,
    upload_file,
)

COMMIT = ".realign-commit.json"
STAGING = ".staging"
QUARANTINE = ".quarantine"
STAGING_TTL_S = 24 * 3600.0


@dataclass(frozen=True)
class Committed:
    """A published artifact as its commit marker describes it."""

    key: str
    kind: Kind
    files: dict[str, tuple[int, str]]  # name -> (size, sha256)
    created: float

    @property
    def size(self) -> int:
        return sum(size for size, _ in self.files.values())


class Bucket:
    """One store prefix in one bucket.

    Args:
        cfg: endpoint and transfer tuning.
        bucket: the bucket name.
        prefix: the store's prefix inside it ("" = the bucket root).
    """

    def __init__(self, cfg: S3Config, bucket: str, prefix: str) -> None:
        self.cfg, self.bucket, self.prefix = cfg, bucket, prefix

    def url(self, *parts: str) -> str:
        return f"s3://{self.bucket}/{self.name(*parts)}"

    def name(self, *parts: str) -> str:
        return "/".join(p for p in (self.prefix, *parts) if p)

    # -- reading --------------------------------------------------------------------------
    def committed(self, key: str, kind: Kind) -> Committed | None:
        """The commit marker of ``key``, or None when it is not (or not yet) published."""
        from botocore.exceptions import ClientError

        client, name = self.cfg.client(), self.name(kind, key, COMMIT)

        def get() -> bytes | None:
            try:
                return bytes(client.get_object(Bucket=self.bucket, Key=name)["Body"].read())
            except ClientError as exc:
                if is_missing(exc):
                    return None
                raise

        body = call(f"read of {self.url(kind, key, COMMIT)}", get)
        if body is None:
            return None
        return _parse(key, kind, body)

    def keys(self, kind: Kind, start: str = "") -> list[str]:
        """Keys of ``kind`` with a commit marker, starting with ``start``."""
        return [k for k in self.listing(kind) if k.startswith(start)]

    def listing(self, kind: Kind) -> dict[str, tuple[int, float]]:
        """Published keys of ``kind`` -> (bytes, publication time), in one listing."""
        base = self.name(kind) + "/"
        sizes: dict[str, int] = {}
        stamps: dict[str, float] = {}
        for obj in list_objects(self.cfg, self.bucket, base):
            key, _, tail = obj["Key"][len(base) :].partition("/")
            if tail == COMMIT:
                stamps[key] = _ts(obj["LastModified"])
            else:
                sizes[key] = sizes.get(key, 0) + int(obj["Size"])
        return {k: (sizes.get(k, 0), t) for k, t in sorted(stamps.items())}

    def read_file(self, done: Committed, rel: str) -> bytes:
        """One (small) file of ``done`` in memory, checked against its sha256.

        Raises:
            ArtifactCorruptError: it does not match the marker.
        """
        client, name = self.cfg.client(), self.name(done.kind, done.key, rel)
        body: bytes = call(
            f"read of s3://{self.bucket}/{name}",
            lambda: client.get_object(Bucket=self.bucket, Key=name)["Body"].read(),
        )
        if hashlib.sha256(body).hexdigest() != done.files[rel][1]:
            raise ArtifactCorruptError(
                f"s3 object {name} does not match its recorded sha256: the copy in the "
                "bucket is damaged",
                file=rel,
            )
        return body

    def fetch(self, done: Committed, dest: Path) -> None:
        """Download every file of ``done`` into ``dest``, checking sizes and sha256.

        Raises:
            ArtifactCorruptError: a file does not match the marker.
        """
        with ThreadPoolExecutor(max_workers=min(4, max(1, len(done.files)))) as pool:
            jobs = [
                pool.submit(
                    download_file,
                    self.cfg,
                    self.bucket,
                    self.name(done.kind, done.key, rel),
                    dest / rel,
                    size,
                    sha,
                )
                for rel, (size, sha) in done.files.items()
            ]
            for job in jobs:
                job.result()

    # -- publishing -----------------------------------------------------------------------
    def publish(
        self,
        src: Path,
        key: str,
        kind: Kind,
        hasher: FileHasher,
        fence: int,
        still_held: Callable[[], None] = lambda: None,
    ) -> None:
        """Upload ``src`` under a staging prefix, copy it into place, then write the
        commit marker last; a failure before the marker publishes nothing.

        Args:
            fence: the build lock's fencing token, recorded in the marker.
            still_held: raises when the build lock was lost; called before the copy
                into place and before the marker.
        """
        token = f"{key}.{uuid.uuid4().hex}"
        rels = relative_files(src)
        hashes = hasher.sha256_many(src / r for r in rels)
        files = {r: ((src / r).stat().st_size, hashes[src / r]) for r in rels}
        with ThreadPoolExecutor(max_workers=4) as pool:
            list(pool.map(lambda r: upload_file(
                self.cfg, src / r, self.bucket, self.name(STAGING, token, r)), rels))  # fmt: skip
            still_held()
            list(pool.map(lambda r: self._copy(self.name(STAGING, token, r),
                                               self.name(kind, key, r)), rels))  # fmt: skip
        marker = {
            "key": key, "kind": kind, "created": time.time(), "fence": fence,
            "builder": f"{socket.gethostname()}:{token}",
            "files": {r: {"size": s, "sha256": h} for r, (s, h) in files.items()},
        }  # fmt: skip
        still_held()
        self._put(self.name(kind, key, COMMIT), json.dumps(marker).encode())
        self.delete_prefix(self.name(STAGING, token) + "/")

    def commit_staged(
        self,
        token: str,
        key: str,
        kind: Kind,
        files: dict[str, tuple[int, str]],
        fence: int,
        still_held: Callable[[], None] = lambda: None,
    ) -> None:
        """Finish a publish whose ``files`` ((size, sha256) by relative path) are already
        under the staging prefix ``token`` (put there by server-side copies and small
        uploads): copy them into place on the server, write the commit marker last (as
        :meth:`publish` does), delete the staging objects.
        """

        def place(rel: str) -> None:
            src, dst = self.name(STAGING, token, rel), self.name(kind, key, rel)
            copy_object(self.cfg, self.bucket, src, dst, files[rel][0])

        still_held()
        with ThreadPoolExecutor(max_workers=4) as pool:
            list(pool.map(place, sorted(files)))
        marker = {
            "key": key, "kind": kind, "created": time.time(), "fence": fence,
            "builder": f"{socket.gethostname()}:{token}",
            "files": {r: {"size": s, "sha256": h} for r, (s, h) in files.items()},
        }  # fmt: skip
        still_held()
        self._put(self.name(kind, key, COMMIT), json.dumps(marker).encode())
        self.delete_prefix(self.name(STAGING, token) + "/")

    def _copy(self, src: str, dst: str) -> None:
        client = self.cfg.client()
        source = {"Bucket": self.bucket, "Key": src}
        call(f"copy to s3://{self.bucket}/{dst}", lambda: client.copy(source, self.bucket, dst))

    def _put(self, name: str, body: bytes) -> None:
        client = self.cfg.client()
        call(
            f"write of s3://{self.bucket}/{name}",
            lambda: client.put_object(Bucket=self.bucket, Key=name, Body=body),
        )

    # -- removal --------------------------------------------------------------------------
    def uncommit(self, key: str, kind: Kind, reason: str = "") -> str:
        """Hide ``key`` at once (its marker moves to ``.quarantine/``, files stay until
        removed or rebuilt); returns where the marker went.

        Raises:
            ArtifactNotFoundError: ``key`` is not published.
        """
        done = self.committed(key, kind)
        if done is None:
            raise ArtifactNotFoundError(f"no {kind[:-1]} {key} in {self.url()}")
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        where = self.name(QUARANTINE, kind, f"{key}.{stamp}.{uuid.uuid4().hex[:6]}.json")
        note = {"reason": reason, "files": {r: list(v) for r, v in done.files.items()}}
        self._put(where, json.dumps(note).encode())
        client, marker = self.cfg.client(), self.name(kind, key, COMMIT)
        call(f"delete of {marker}", lambda: client.delete_object(Bucket=self.bucket, Key=marker))
        return f"s3://{self.bucket}/{where}"

    def delete_prefix(self, prefix: str) -> None:
        client = self.cfg.client()
        names = [o["Key"] for o in list_objects(self.cfg, self.bucket, prefix)]
        for i in range(0, len(names), 1000):
            batch = {"Objects": [{"Key": n} for n in names[i : i + 1000]], "Quiet": True}
            call(
                f"delete under s3://{self.bucket}/{prefix}",
                functools.partial(client.delete_objects, Bucket=self.bucket, Delete=batch),
            )

    def sweep_staging(self, now: float | None = None) -> int:
        """Delete staging objects older than ``STAGING_TTL_S`` (their builder died)."""
        now = time.time() if now is None else now
        old = [
            o["Key"]
            for o in list_objects(self.cfg, self.bucket, self.name(STAGING) + "/")
            if _ts(o["LastModified"]) + STAGING_TTL_S < now
        ]
        client = self.cfg.client()
        for name in old:
            call(
                f"delete of {name}",
                functools.partial(client.delete_object, Bucket=self.bucket, Key=name),
            )
        return len(old)


def _ts(value: Any) -> float:
    return float(value.timestamp()) if isinstance(value, datetime) else time.time()


def _parse(key: str, kind: Kind, body: bytes) -> Committed:
    data = json.loads(body)
    files = {r: (int(e["size"]), str(e["sha256"])) for r, e in data["files"].items()}
    return Committed(key, kind, files, float(data.get("created", 0.0)))
