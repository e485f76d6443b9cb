"""Where the shards of a merge split across workers wait until the last one is written.

Each delivery of a shard task writes into a directory of its own, then moves the
finished file into the job's staging area; nothing there is visible as a model. The
final task publishes the files through the store, so a reader sees all shards with
their manifest or nothing.

``LocalShardStaging`` keeps the area on the store's filesystem (a directory every
worker mounts); the final task links the files into the store's staging directory.
``ObjectShardStaging`` keeps it under a key prefix of the object store's bucket:
``put`` uploads one finished file, ``copy_to`` copies it on the server into the
model's staging prefix (the final task reads none of it), ``discard`` deletes the
prefix.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

from app.core.errors import ArtifactCorruptError
from app.store.remote import Bucket
from app.store.s3 import copy_object, download_file, list_objects, object_size, upload_file

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
    for workers on different machines: each shard is uploaded when written and copied
    on the server into the model's staging prefix by the final task.

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

    def copy_to(self, job_id: str, name: str, dest: str, size: int) -> None:
        """Copy the staged shard ``name`` to the object ``dest`` of the same bucket, on the
        server, once its size is the ``size`` its writer recorded (a HEAD, no GET).

        Raises:
            ArtifactCorruptError: the staged object is missing or of another size.
        """
        key = self._name(job_id, name)
        found = object_size(self.bucket.cfg, self.bucket.bucket, key)
        if found != size:
            raise ArtifactCorruptError(
                f"staged shard s3://{self.bucket.bucket}/{key}: "
                f"{'missing' if found is None else f'{found} bytes'}, its worker wrote {size}; "
                "nothing was published — submit the merge again",
                file=name,
            )
        copy_object(self.bucket.cfg, self.bucket.bucket, key, dest, size)

    def upload(self, file: Path, dest: str) -> None:
        """Upload a small file of the final task to the object ``dest`` of the bucket."""
        upload_file(self.bucket.cfg, file, self.bucket.bucket, dest)

    def discard(self, job_id: str) -> None:
        self.bucket.delete_prefix(self._name(job_id) + "/")
        self.local.discard(job_id)

    def jobs(self) -> list[str]:
        prefix = self.bucket.name(SHARDS) + "/"
        found = list_objects(self.bucket.cfg, self.bucket.bucket, prefix)
        staged = {o["Key"][len(prefix) :].split("/", 1)[0] for o in found}
        return sorted(staged | set(self.local.jobs()))  # and this node's scratch
