"""S3-compatible object access (AWS S3, MinIO, GCS interop) through boto3.

boto3 is imported lazily: a store on local disk never needs it. Credentials come
from the standard AWS chain (``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY``,
``AWS_PROFILE``, an instance or pod role); only the endpoint is a Realign setting.
Uploads are multipart and parallel (boto3's ``TransferConfig``); downloads fetch
byte ranges in parallel and hash each file as it is written.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from app.core.errors import ArtifactCorruptError, MissingExtraError, StoreUnavailableError

PART_BYTES = 16 * 1024**2
MAX_COPY_BYTES = 5 * 1024**3  # the largest object one CopyObject request may copy
MAX_PARTS = 10_000  # parts of one multipart upload
T = TypeVar("T")


@dataclass(frozen=True)
class S3Config:
    """How to reach the object store.

    Args:
        endpoint_url: an S3-compatible endpoint (MinIO, GCS interop, a test server);
            None = AWS S3.
        workers: parallel transfers per file (parts of an upload, ranges of a download).
        part_bytes: multipart upload part size and download range size.
    """

    endpoint_url: str | None = None
    workers: int = 8
    part_bytes: int = PART_BYTES
    _clients: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def client(self) -> Any:
        """A boto3 S3 client (one per config; boto3 clients are thread-safe)."""
        if "s3" not in self._clients:
            try:
                import boto3
                from botocore.config import Config
            except ImportError:
                raise MissingExtraError(
                    "the object store needs boto3: pip install 'realign[s3]'"
                ) from None
            cfg = Config(
                max_pool_connections=max(10, self.workers * 4),
                retries={"max_attempts": 3, "mode": "standard"},
                connect_timeout=5,
                read_timeout=60,
            )
            self._clients["s3"] = boto3.client("s3", endpoint_url=self.endpoint_url, config=cfg)
        return self._clients["s3"]


def split_url(url: str) -> tuple[str, str]:
    """``s3://bucket/some/prefix`` -> (``bucket``, ``some/prefix``) without slashes at
    the ends."""
    rest = url.removeprefix("s3://")
    bucket, _, prefix = rest.partition("/")
    return bucket, prefix.strip("/")


class ObjectMissingError(StoreUnavailableError):
    """An object is not in the bucket (404), or is shorter than the range asked (416)."""


class ObjectChangedError(StoreUnavailableError):
    """An object was replaced while it was being read (its ETag no longer matches)."""


_MISSING = ("404", "NoSuchKey", "NotFound", "416", "InvalidRange")


def call(what: str, fn: Callable[[], T]) -> T:
    """Run one S3 request, turning connection failures and service errors into
    :class:`StoreUnavailableError` (what failed, where, what to do)."""
    from boto3.exceptions import Boto3Error
    from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

    try:
        return fn()
    except NoCredentialsError:
        raise StoreUnavailableError(
            f"no credentials for the object store ({what}): set AWS_ACCESS_KEY_ID and "
            "AWS_SECRET_ACCESS_KEY or AWS_PROFILE, or give the machine or pod a role"
        ) from None
    except ClientError as exc:
        err = exc.response.get("Error", {})
        if err.get("Code") in ("412", "PreconditionFailed"):
            raise ObjectChangedError(
                f"{what}: the object was replaced while it was being read; run it again "
                "(an upload over the same name, e.g. a checkpoint pushed again)"
            ) from None
        kind = ObjectMissingError if err.get("Code") in _MISSING else StoreUnavailableError
        raise kind(
            f"object store refused {what}: {err.get('Code', '?')} {err.get('Message', '')}"
            " — check the bucket, REALIGN_STORE_URL and the AWS credentials"
        ) from None
    except (BotoCoreError, Boto3Error) as exc:
        raise StoreUnavailableError(
            f"object store unreachable during {what}: {exc} — check REALIGN_S3_ENDPOINT_URL "
            "and that the store is up; the job can be submitted again once it is"
        ) from None


def is_missing(exc: BaseException) -> bool:
    """True for a 404 / NoSuchKey from S3."""
    from botocore.exceptions import ClientError

    if not isinstance(exc, ClientError):
        return False
    return exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound")


def list_objects(cfg: S3Config, bucket: str, prefix: str) -> Iterator[dict[str, Any]]:
    """Every object under ``prefix`` (``Key``, ``Size``, ``ETag``, ``LastModified``)."""
    pages = cfg.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    for page in call(f"list s3://{bucket}/{prefix}", lambda: list(pages)):
        yield from page.get("Contents", [])


def upload_file(cfg: S3Config, path: Path, bucket: str, key: str) -> None:
    """Upload one file, multipart with parallel parts above ``part_bytes``."""
    from boto3.s3.transfer import TransferConfig

    tc = TransferConfig(
        multipart_threshold=cfg.part_bytes,
        multipart_chunksize=cfg.part_bytes,
        max_concurrency=cfg.workers,
        use_threads=True,
    )
    call(
        f"upload of s3://{bucket}/{key}",
        lambda: cfg.client().upload_file(str(path), bucket, key, Config=tc),
    )


def download_file(
    cfg: S3Config,
    bucket: str,
    key: str,
    dest: Path,
    size: int,
    sha256: str | None,
    etag: str | None = None,
) -> None:
    """Download one object into ``dest`` by parallel byte ranges, then check its size
    and sha256 (as recorded in the artifact's manifest).

    Raises:
        ArtifactCorruptError: the bytes do not match the recorded size or sha256.
        StoreUnavailableError: the store cannot be reached.
    """
    client = cfg.client()
    dest.parent.mkdir(parents=True, exist_ok=True)
    ranges = [(o, min(o + cfg.part_bytes, size) - 1) for o in range(0, size, cfg.part_bytes)]
    with dest.open("wb") as fh:
        fh.truncate(size)

    def fetch(span: tuple[int, int]) -> None:
        match = {"IfMatch": etag} if etag else {}  # every range of one version
        got = client.get_object(Bucket=bucket, Key=key, Range=f"bytes={span[0]}-{span[1]}", **match)
        data = got["Body"].read()
        with dest.open("r+b") as out:
            out.seek(span[0])
            out.write(data)

    with ThreadPoolExecutor(max_workers=cfg.workers) as pool:
        call(f"download of s3://{bucket}/{key}", lambda: list(pool.map(fetch, ranges)))
    if size == 0:
        dest.write_bytes(b"")
    _check(dest, size, sha256, key)


def read_range(cfg: S3Config, bucket: str, key: str, start: int, end: int) -> bytes:
    """Bytes ``[start, end]`` (inclusive, as HTTP ranges are) of one object.

    Raises:
        StoreUnavailableError: the store cannot be reached.
    """
    client = cfg.client()
    return call(  # type: ignore[no-any-return]
        f"read of s3://{bucket}/{key} bytes {start}-{end}",
        lambda: client.get_object(Bucket=bucket, Key=key, Range=f"bytes={start}-{end}")[
            "Body"
        ].read(),
    )


def object_size(cfg: S3Config, bucket: str, key: str) -> int | None:
    """The size of an object (a HEAD request), or None when there is none."""
    from botocore.exceptions import ClientError

    client = cfg.client()

    def head() -> int | None:
        try:
            return int(client.head_object(Bucket=bucket, Key=key)["ContentLength"])
        except ClientError as exc:
            if is_missing(exc):
                return None
            raise

    return call(f"HEAD of s3://{bucket}/{key}", head)


def copy_object(
    cfg: S3Config, bucket: str, src: str, dst: str, size: int, max_single: int = MAX_COPY_BYTES
) -> None:
    """Copy ``src`` to ``dst`` inside ``bucket`` on the server: one CopyObject up to
    ``max_single`` bytes, else a multipart upload of UploadPartCopy ranges in parallel.
    No byte passes through this machine.

    Raises:
        StoreUnavailableError: the store refused or cannot be reached.
    """
    client = cfg.client()
    source = {"Bucket": bucket, "Key": src}
    what = f"copy of s3://{bucket}/{src} to {dst}"
    if size <= max_single:
        call(what, lambda: client.copy_object(Bucket=bucket, Key=dst, CopySource=source))
        return
    part = max(cfg.part_bytes, -(-size // MAX_PARTS))
    upload = call(what, lambda: client.create_multipart_upload(Bucket=bucket, Key=dst))
    uid = upload["UploadId"]

    def one(number: int, start: int) -> dict[str, Any]:
        span = f"bytes={start}-{min(start + part, size) - 1}"
        got = client.upload_part_copy(
            Bucket=bucket, Key=dst, UploadId=uid, PartNumber=number,
            CopySource=source, CopySourceRange=span,
        )  # fmt: skip
        return {"PartNumber": number, "ETag": got["CopyPartResult"]["ETag"]}

    try:
        with ThreadPoolExecutor(max_workers=cfg.workers) as pool:
            starts = range(0, size, part)
            parts = call(what, lambda: list(pool.map(one, range(1, len(starts) + 1), starts)))
        done = {"Parts": parts}
        call(what, lambda: client.complete_multipart_upload(
            Bucket=bucket, Key=dst, UploadId=uid, MultipartUpload=done))  # fmt: skip
    except BaseException:
        with contextlib.suppress(Exception):  # else a lifecycle rule removes the parts
            client.abort_multipart_upload(Bucket=bucket, Key=dst, UploadId=uid)
        raise


def _check(dest: Path, size: int, sha256: str | None, key: str) -> None:
    actual = dest.stat().st_size
    name = key.rsplit("/", 1)[-1]
    if actual != size:
        raise ArtifactCorruptError(f"s3 object {key}: {actual} bytes, expected {size}", file=name)
    if sha256 is None:
        return
    h = hashlib.sha256()
    with dest.open("rb") as fh:
        while chunk := fh.read(8 * 1024**2):
            h.update(chunk)
    if h.hexdigest() != sha256:
        raise ArtifactCorruptError(
            f"s3 object {key} does not match its recorded sha256 (got {h.hexdigest()[:12]}…, "
            f"recorded {sha256[:12]}…): the copy in the bucket is damaged",
            file=name,
        )


def sha256_file(path: Path) -> str:
    """sha256 of a file, read in 8 MiB chunks."""
    h = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(8 * 1024**2):
            h.update(chunk)
    return h.hexdigest()


def relative_files(root: Path) -> list[str]:
    """Files under ``root`` as sorted POSIX paths relative to it."""
    return (
        sorted(
            p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file() or p.is_symlink()
        )
        if root.is_dir()
        else []
    )


def cpu_workers() -> int:
    """A sensible default of parallel transfers for this machine."""
    return max(4, min(16, (os.cpu_count() or 2) * 2))
