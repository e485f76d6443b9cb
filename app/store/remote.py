"""The bucket layout of an object store, and reading and removing its artifacts.

``<prefix>/<kind>/<key>/.realign-commit.json`` is an artifact's commit marker: the
size and sha256 of every file and the builder prefix that holds them,
``<kind>/<key>/.build-<fence>-<id>/<file>``. Each builder uploads under a prefix of
its own and commits by writing the marker only if none exists (:mod:`app.store.commit`),
so a builder that paused past its lease cannot overwrite a published entry. Readers
see only artifacts with a marker and check every file against it. Uploads nobody
committed are ignored by readers and swept a day later (:mod:`app.store.sweep`; a
bucket lifecycle rule that aborts incomplete multipart uploads is advised too).

Removal deletes the marker first (new readers stop seeing the artifact at once),
then the files it names. A node that already holds a copy in its cache keeps it; a
download that was under way fails with ``ArtifactNotFoundError`` and caches nothing.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from app.core.errors import ArtifactCorruptError, ArtifactNotFoundError, StoreUnavailableError
from app.store.base import Kind
from app.store.s3 import (
    ObjectMissingError,
    S3Config,
    call,
    download_file,
    is_missing,
    list_objects,
)

COMMIT = ".realign-commit.json"
BUILD = ".build-"  # a builder's own upload prefix inside an artifact's prefix
STAGING = ".staging"  # where builders uploaded before per-builder prefixes (swept)
QUARANTINE = ".quarantine"
STAGING_TTL_S = 24 * 3600.0


@dataclass(frozen=True)
class Committed:
    """A published artifact as its commit marker describes it."""

    key: str
    kind: Kind
    files: dict[str, tuple[int, str]]  # name -> (size, sha256)
    created: float
    data: str = ""  # the builder prefix of the files; "" = directly under the key (old)

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

    def file(self, done: Committed, rel: str) -> str:
        """The object name of file ``rel`` of ``done``."""
        return self.name(done.kind, done.key, done.data, rel)

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
        return [k for k in self.listing(kind, start) if k.startswith(start)]

    def listing(self, kind: Kind, start: str = "") -> dict[str, tuple[int, float]]:
        """Published keys of ``kind`` (starting with ``start``) -> (bytes, publication
        time), from one listing (plus a marker read for a key that also has uncommitted
        uploads)."""
        out = {}
        for key, entry in sorted(self.scan(kind, start).items()):
            if entry.marker is None:
                continue
            if len(entry.groups) == 1:
                size = sum(int(o["Size"]) for o in next(iter(entry.groups.values())))
            elif (done := self.committed(key, kind)) is not None:
                size = done.size
            else:  # removed since the listing
                continue
            out[key] = (size, entry.marker)
        return out

    def scan(self, kind: Kind, start: str = "") -> dict[str, Scanned]:
        """Every key of ``kind`` (starting with ``start``) in the bucket, committed or
        not, with its objects."""
        base = self.name(kind) + "/"
        out: dict[str, Scanned] = {}
        for obj in list_objects(self.cfg, self.bucket, base + start):
            key, _, tail = obj["Key"][len(base) :].partition("/")
            entry = out.setdefault(key, Scanned())
            if tail == COMMIT:
                entry.marker = ts(obj["LastModified"])
            else:
                group = tail.partition("/")[0] if tail.startswith(BUILD) else ""
                entry.groups.setdefault(group, []).append(obj)
        return out

    def read_file(self, done: Committed, rel: str) -> bytes:
        """One (small) file of ``done`` in memory, checked against its sha256.

        Raises:
            ArtifactCorruptError: it does not match the marker.
            ArtifactNotFoundError: the artifact was removed meanwhile.
        """
        client, name = self.cfg.client(), self.file(done, rel)
        with self._still_there(done):
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
            ArtifactNotFoundError: the artifact was removed meanwhile.
        """
        with (
            self._still_there(done),
            ThreadPoolExecutor(max_workers=min(4, max(1, len(done.files)))) as pool,
        ):
            jobs = {
                rel: pool.submit(
                    download_file,
                    self.cfg,
                    self.bucket,
                    self.file(done, rel),
                    dest / rel,
                    size,
                    sha,
                )
                for rel, (size, sha) in done.files.items()
            }
            for rel, job in jobs.items():
                try:
                    job.result()
                except ObjectMissingError as exc:
                    if self.committed(done.key, done.kind) != done:
                        raise  # removed meanwhile (see _still_there)
                    raise ArtifactCorruptError(  # deleted, or cut short, since its commit
                        f"{done.kind[:-1]} {done.key}: {rel} is missing from {self.url()} "
                        f"or shorter than its commit says ({exc.message})",
                        file=rel,
                    ) from None

    @contextlib.contextmanager
    def _still_there(self, done: Committed) -> Iterator[None]:
        """Turn a failed read of ``done``'s files into ArtifactNotFoundError when
        ``done`` is no longer the commit (removed, or removed and rebuilt)."""
        try:
            yield
        except StoreUnavailableError:
            if self.committed(done.key, done.kind) == done:
                raise
            raise ArtifactNotFoundError(
                f"{done.kind[:-1]} {done.key} was removed from {self.url()} while it was "
                "being read; run the job again to build it again"
            ) from None

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
    def delete(self, key: str, kind: Kind) -> Committed:
        """Remove ``key``: its marker first (new readers everywhere stop seeing it),
        then the files that marker names (uploads of a rebuild are not touched).

        Raises:
            ArtifactNotFoundError: ``key`` is not published.
        """
        done = self._committed_or_raise(key, kind)
        self.delete_names([self.name(kind, key, COMMIT)])
        self.delete_names([self.file(done, r) for r in done.files])
        return done

    def uncommit(self, key: str, kind: Kind, reason: str = "") -> str:
        """Hide ``key`` at once (its marker moves to ``.quarantine/``, files stay until
        the sweep, a day after the quarantine); returns where the marker went.

        Raises:
            ArtifactNotFoundError: ``key`` is not published.
        """
        done = self._committed_or_raise(key, kind)
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        where = self.name(QUARANTINE, kind, f"{key}.{stamp}.{uuid.uuid4().hex[:6]}.json")
        note = {
            "reason": reason,
            "data": done.data,
            "files": {r: list(v) for r, v in done.files.items()},
        }
        self._put(where, json.dumps(note).encode())
        self.delete_names([self.name(kind, key, COMMIT)])
        return f"s3://{self.bucket}/{where}"

    def _committed_or_raise(self, key: str, kind: Kind) -> Committed:
        done = self.committed(key, kind)
        if done is None:
            raise ArtifactNotFoundError(f"no {kind[:-1]} {key} in {self.url()}")
        return done

    def delete_prefix(self, prefix: str) -> None:
        self.delete_names([o["Key"] for o in list_objects(self.cfg, self.bucket, prefix)])

    def delete_names(self, names: list[str]) -> None:
        client = self.cfg.client()
        for i in range(0, len(names), 1000):
            batch = {"Objects": [{"Key": n} for n in names[i : i + 1000]], "Quiet": True}
            call(
                f"delete in s3://{self.bucket}/{self.prefix}",
                functools.partial(client.delete_objects, Bucket=self.bucket, Delete=batch),
            )

    def sweep_staging(self, now: float | None = None) -> int:
        """Delete uploads nobody committed, a day old (their builder died or lost);
        returns how many objects went."""
        from app.store.sweep import sweep

        return sweep(self, time.time() if now is None else now, STAGING_TTL_S)


@dataclass
class Scanned:
    """One key's objects as a listing shows them."""

    marker: float | None = None  # the commit marker's LastModified
    groups: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # prefix -> objects


def ts(value: Any) -> float:
    """A listing's LastModified as a POSIX time."""
    return float(value.timestamp()) if isinstance(value, datetime) else time.time()


def _parse(key: str, kind: Kind, body: bytes) -> Committed:
    data = json.loads(body)
    files = {r: (int(e["size"]), str(e["sha256"])) for r, e in data["files"].items()}
    return Committed(key, kind, files, float(data.get("created", 0.0)), str(data.get("data", "")))
