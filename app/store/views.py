"""Partial local copies of stored residual packs and ``s3://`` models: what one task of
a split merge reads, and nothing more.

A view is a directory laid out like the artifact. Small files (manifest, configs,
tokenizer files) are downloaded whole and checked against their sha256. Every
safetensors file is there at its full size but holds only its header (one or two
ranged GETs); the rest is a hole of a sparse file, so the directory opens and plans
like the real one. :meth:`RemoteView.fill` then downloads, whole, the files whose
tensors the task reads, each checked against its sha256 as it lands.

Integrity: tensor bytes are only ever read from files fetched whole and checked
against the sha256 recorded for them (the commit marker of a pack, the pinned
identity of a model). A header read on its own cannot be checked against a file
hash; it is used only to plan, and the caller checks the plan it gives against the
one recorded when the split was planned. Every file is fetched whole by at least one
task of the split, so a damaged one fails the job before anything is published.
"""

from __future__ import annotations

import struct
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from pathlib import Path

from app.core.errors import ArtifactCorruptError, ArtifactNotFoundError, ModelNotFoundError
from app.residuals.checkpoint import INDEX_NAME
from app.residuals.manifest import SourceInfo
from app.residuals.refs import ModelRef
from app.residuals.sources import digest_of
from app.store.remote import Bucket
from app.store.s3 import S3Config, download_file, read_range, split_url

HEAD_GUESS = 64 * 1024  # one GET holds most safetensors headers (~100 bytes a tensor)
_MAX_HEADER = 100 * 1024 * 1024  # as app.residuals.checkpoint


@dataclass(frozen=True)
class RemoteFile:
    """One object of a view: its key in the bucket, size and recorded sha256."""

    key: str
    size: int
    sha256: str | None


class RemoteView:
    """A local directory of some files of a remote artifact (see the module).

    Args:
        cfg: how to reach the object store.
        bucket: the bucket the files are in.
        files: relative path -> object.
        root: the local directory (created; the caller removes it).
        label: how errors name the artifact.
    """

    def __init__(
        self, cfg: S3Config, bucket: str, files: dict[str, RemoteFile], root: Path, label: str
    ) -> None:
        self.cfg, self.bucket, self.files, self.root, self.label = cfg, bucket, files, root, label
        self.whole: set[str] = set()  # files fetched in full (and checked)
        self.fetched = 0  # bytes downloaded, headers included

    def open(self, small: Collection[str]) -> RemoteView:
        """Fetch the ``small`` files whole and every safetensors header; returns self."""
        self.root.mkdir(parents=True, exist_ok=True)
        self.fill(small)
        for rel in sorted(self.files):
            if rel.endswith(".safetensors") and rel not in self.whole:
                self._sparse(rel)
        return self

    def fill(self, names: Iterable[str]) -> None:
        """Download ``names`` whole (once), each checked against its sha256.

        Raises:
            ArtifactCorruptError: a file does not match its recorded size or sha256.
        """
        for rel in sorted(set(names) - self.whole):
            f = self.files[rel]
            download_file(self.cfg, self.bucket, f.key, self.root / rel, f.size, f.sha256)
            self.whole.add(rel)
            self.fetched += f.size

    def _sparse(self, rel: str) -> None:
        f = self.files[rel]
        head = self._header(rel, f)
        path = self.root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("wb") as fh:
            fh.write(head)
            fh.truncate(f.size)  # a hole: no disk used, never read

    def _header(self, rel: str, f: RemoteFile) -> bytes:
        head = read_range(self.cfg, self.bucket, f.key, 0, min(f.size, HEAD_GUESS) - 1)
        if len(head) < 8:
            raise self._corrupt(rel, f"only {len(head)} bytes")
        need = 8 + struct.unpack("<Q", head[:8])[0]
        if need > min(f.size, _MAX_HEADER + 8):
            raise self._corrupt(rel, f"a header of {need - 8} bytes in a {f.size}-byte file")
        if need > len(head):
            head += read_range(self.cfg, self.bucket, f.key, len(head), need - 1)
        self.fetched += len(head)
        return head[:need]

    def _corrupt(self, rel: str, what: str) -> ArtifactCorruptError:
        return ArtifactCorruptError(
            f"{self.label}: {rel} in the object store is not a safetensors file ({what}) — "
            "the copy in the bucket is damaged; remove it (`realign rm`) and build it again",
            file=rel,
        )


def pack_view(bucket: Bucket, key: str, root: Path) -> RemoteView:
    """A view of the stored residual pack ``key``: manifest and assets whole, shard
    headers only.

    Raises:
        ArtifactNotFoundError: the pack is not published.
        ArtifactCorruptError, StoreUnavailableError.
    """
    done = bucket.committed(key, "residuals")
    if done is None:
        raise ArtifactNotFoundError(
            f"residual {key} is not in {bucket.url()}; `realign ls` lists what is"
        )
    files = {
        rel: RemoteFile(bucket.file(done, rel), size, sha)
        for rel, (size, sha) in done.files.items()
    }
    view = RemoteView(bucket.cfg, bucket.bucket, files, root, f"residual {key}")
    # An exact pack's frames files are planned from its index (a small file) alone.
    return view.open([rel for rel in files if not rel.endswith((".safetensors", ".frames"))])


def model_view(cfg: S3Config, ref: str, source: SourceInfo, root: Path) -> RemoteView:
    """A view of the pinned ``s3://bucket/prefix@sha256:<digest>`` model that ``source``
    describes: config and index whole, weight headers only (tokenizer files are not
    read by a merge of tensors).

    Raises:
        ModelNotFoundError: the ref is not pinned, or ``source`` is not its content.
        ArtifactCorruptError, StoreUnavailableError.
    """
    parsed = ModelRef.parse(ref)
    if parsed.kind != "s3" or parsed.revision != f"sha256:{digest_of(source.files)}":
        raise ModelNotFoundError(
            f"{ref}: not an s3:// reference pinned to the content the split was planned "
            f"with (sha256:{source.digest[:12]}…); submit the job again"
        )
    bucket, prefix = split_url(f"s3://{parsed.repo}")
    files = {
        name: RemoteFile(f"{prefix}/{name}", e.size, e.sha256)
        for name, e in source.files.items()
        if name.endswith(".safetensors") or name in ("config.json", INDEX_NAME)
    }
    view = RemoteView(cfg, bucket, files, root, ref)
    return view.open([n for n in files if not n.endswith(".safetensors")])
