"""Where the shards of a merge split across workers wait until the last one is written.

Each delivery of a shard task writes into a directory of its own, then moves the
finished file into the job's staging area; nothing there is visible as a model. The
final task links the files into the store's own staging directory and publishes
through the store, so a reader sees all shards with their manifest or nothing.

``LocalShardStaging`` keeps the area on the store's filesystem (a directory every
worker mounts). An object-store backend keeps the same contract with a key prefix:
``put`` uploads one finished file, ``take`` downloads it (sha256 checked against what
its writer recorded), ``discard`` deletes the prefix.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

from app.store.remote import Bucket
from app.store.s3 import download_file, list_objects, upload_file

SHARDS = ".shards"  # beside the store's artifacts, never listed as one


class ShardStaging(Protocol):
    """Staging of output shards of one job, shared by every worker of the job."""

    def writing(self, job_id: str) -> contextlib.AbstractContextManager[Path]:
        """An empty directory for one delivery of a shard task, removed on exit."""
        ...

    def put(self, job_id: str, file: Path) -> None:
        """Keep the finished shard ``file`` (a later delivery's identical copy replaces it)."""
        ...

    def take(self, job_id: str, name: str, dest: Path, size: int, sha256: str) -> None:
        """Place the staged shard ``name`` at ``dest`` (the publishing directory); a
        copy that travelled is checked against the ``size`` and ``sha256`` its writer
        recorded."""
        ...

    def discard(self, job_id: str) -> None:
        """Remove everything staged for ``job_id``."""
        ...

    def jobs(self) -> list[str]:
        """Ids of the jobs that have something staged."""
        ...


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class LocalShardStaging:
    """Shard staging in a directory of the store's filesystem (``<store>/.shards``).

    Args:
        root: the staging directory, on the same filesystem as the store (files are
            linked into the store's staging, not copied).
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)

    def _dir(self, job_id: str) -> Path:
        if not job_id or "/" in job_id or job_id.startswith("."):
            raise ValueError(f"not a job id: {job_id!r}")
        return self.root / job_id

    @contextlib.contextmanager
    def writing(self, job_id: str) -> Iterator[Path]:
        tmp = self._dir(job_id) / f".w-{uuid.uuid4().hex[:12]}"
        tmp.mkdir(parents=True)
        try:
            yield tmp
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def put(self, job_id: str, file: Path) -> None:
        _fsync(file)
        dest = self._dir(job_id) / file.name
        os.replace(file, dest)
        _fsync(dest.parent)

    def take(self, job_id: str, name: str, dest: Path, size: int, sha256: str) -> None:
        src = self._dir(job_id) / name
        try:
            os.link(src, dest)  # no copy: the store publishes the same inode
        except OSError:
            shutil.copyfile(src, dest)

    def discard(self, job_id: str) -> None:
        shutil.rmtree(self._dir(job_id), ignore_errors=True)

    def jobs(self) -> list[str]:
        return sorted(p.name for p in self.root.iterdir() if p.is_dir())


class ObjectShardStaging:
    """Shard staging under ``<store prefix>/.shards/<job>/`` in the object store's bucket,
    for workers on different machines: each shard is uploaded when written and
    downloaded, sha256 checked, by the final task.

    Args:
        bucket: the object store's bucket and prefix.
        scratch: a local directory for shards being written (this node's cache).
    """

    def __init__(self, bucket: Bucket, scratch: Path) -> None:
        self.bucket = bucket
        self.local = LocalShardStaging(scratch)

    def _name(self, job_id: str, file: str = "") -> str:
        self.local._dir(job_id)  # the same check of the id
        return self.bucket.name(SHARDS, job_id, file)

    def writing(self, job_id: str) -> contextlib.AbstractContextManager[Path]:
        return self.local.writing(job_id)

    def put(self, job_id: str, file: Path) -> None:
        upload_file(self.bucket.cfg, file, self.bucket.bucket, self._name(job_id, file.name))
        file.unlink()

    def take(self, job_id: str, name: str, dest: Path, size: int, sha256: str) -> None:
        key = self._name(job_id, name)
        download_file(self.bucket.cfg, self.bucket.bucket, key, dest, size, sha256)

    def discard(self, job_id: str) -> None:
        self.bucket.delete_prefix(self._name(job_id) + "/")
        self.local.discard(job_id)

    def jobs(self) -> list[str]:
        prefix = self.bucket.name(SHARDS) + "/"
        found = list_objects(self.bucket.cfg, self.bucket.bucket, prefix)
        return sorted({o["Key"][len(prefix) :].split("/", 1)[0] for o in found})
