"""ObjectStore: artifacts in an S3-compatible bucket, read through a node-local cache.

The bucket holds the published artifacts (same content-addressed keys as a
``LocalStore``), each committed by a marker only one builder can write
(:mod:`app.store.commit`). Every node reads from its own cache, a ``LocalStore`` with
its own LRU budget: an artifact is downloaded on first use (parallel byte ranges,
each file checked against its sha256) and pinned there while it is read. A builder
builds in the cache's staging, uploads, commits, and only then moves its build into
the cache: nobody on its node sees an artifact the bucket has not committed. A build
lock the caller hands in (a :class:`~app.store.locks.BuildLock`, e.g. Redis)
deduplicates builds across machines; without one, builders on one node wait for each
other through the cache's ``flock``, and on different nodes the first commit wins.

Removal (``realign rm``, the bucket budget) deletes the marker first, then the files:
readers that start afterwards do not find the artifact; nodes whose cache holds a
copy keep it (same key, same bytes) for the readers that hold it, but never publish
it again: a build of a key the bucket lacks drops the cached copy (quarantined if it
no longer matches its manifest) and builds from the sources. A download under way
fails with ``ArtifactNotFoundError`` and caches nothing.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Collection, Iterator
from pathlib import Path

from app.core.errors import (
    ArtifactCorruptError,
    ArtifactInUseError,
    ArtifactNotFoundError,
    BuildLockLostError,
    StoreUnavailableError,
)
from app.residuals.manifest import MergeManifest, ResidualManifest
from app.store.base import WEIGHT_KINDS, ArtifactInfo, Kind, evict_lru
from app.store.commit import build_prefix, commit_files, publish
from app.store.keys import pick_key
from app.store.local import LocalStore
from app.store.locks import BuildLock, Held, hold
from app.store.remote import Bucket
from app.store.s3 import S3Config, split_url
from app.store.staging import copy_tree
from app.store.stale import drop_stale

log = logging.getLogger(__name__)


class ObjectStore:
    """A content-addressed store in a bucket, with a node-local read-through cache.

    Args:
        url: ``s3://bucket/prefix`` of the store.
        cache: this node's cache (a ``LocalStore`` with the cache budget).
        s3: endpoint and transfer tuning.
        lock: a build lock shared by every machine; None = the cache's local locking
            (the bucket's conditional commit still lets only one build publish).
        lease_s: lease of a builder on the build lock; also how long a newly committed
            artifact is spared by the bucket budget.
        budget_bytes: size budget of the bucket store (None = unbounded; a bucket
            lifecycle rule can bound it instead).
    """

    def __init__(
        self,
        url: str,
        cache: LocalStore,
        *,
        s3: S3Config,
        lock: BuildLock | None = None,
        lease_s: float = 120.0,
        budget_bytes: int | None = None,
    ) -> None:
        self.url = url
        self.bucket = Bucket(s3, *split_url(url))
        self.cache = cache
        self.root = cache.root
        self.hasher = cache.hasher
        self.s3 = s3
        self.lock = lock
        self.lease_s = lease_s
        self.budget_bytes = budget_bytes

    # -- lookup ---------------------------------------------------------------------------
    def path(self, key: str, kind: Kind = "residuals") -> Path:
        return self.cache.path(key, kind)

    def exists(self, key: str, kind: Kind = "residuals") -> bool:
        return self.bucket.committed(key, kind) is not None

    def resolve(self, prefix: str, kind: Kind = "residuals") -> str:
        """Expand a unique key prefix to the full key.

        Raises:
            ArtifactNotFoundError, AmbiguousKeyError.
        """
        return pick_key(prefix, self.keys(kind, prefix), kind, self.url)

    def keys(self, kind: Kind, prefix: str = "") -> list[str]:
        return self.bucket.keys(kind, prefix)

    @contextlib.contextmanager
    def using(self, key: str, kind: Kind = "residuals") -> Iterator[Path]:
        """Hold ``key`` for reading from the cache, downloading it first if needed."""
        with self.cache.pinned(key):
            self._fetch(key, kind)
            with self.cache.using(key, kind) as path:
                yield path

    def touch(self, key: str) -> None:
        self.cache.touch(key)

    def read_text(self, key: str, name: str, kind: Kind = "residuals") -> str:
        """One small file of an artifact (a manifest): from the cache, else from the
        bucket, checked against the sha256 its commit marker records.

        Raises:
            ArtifactNotFoundError, ArtifactCorruptError.
        """
        if self.cache.exists(key, kind):
            return self.cache.read_text(key, name, kind)
        done = self.bucket.committed(key, kind)
        if done is None or name not in done.files:
            raise ArtifactNotFoundError(f"{kind[:-1]} {key} has no {name} in {self.url}")
        return self.bucket.read_file(done, name).decode()

    def _fetch(self, key: str, kind: Kind) -> None:
        """Download ``key`` into the cache unless it is there.

        Raises:
            ArtifactNotFoundError: not published.
            ArtifactCorruptError: a downloaded file does not match its sha256; the bad
                copy is kept in the cache's quarantine (its manifest lets recovery
                rebuild the artifact).
        """
        if self.cache.exists(key, kind):
            return
        done = self.bucket.committed(key, kind)
        if done is None:
            raise ArtifactNotFoundError(
                f"{kind[:-1]} {key} is not in {self.url}; `realign ls` lists what is"
            )

        def download(tmp: Path) -> None:
            try:
                self.bucket.fetch(done, tmp)
            except ArtifactCorruptError as exc:
                _keep_evidence(tmp, exc.file)
                moved = self.cache.quarantine_dir(tmp, key, kind, str(exc), log=False)
                log.warning("%s %s: corrupt download kept at %s", kind[:-1], key, moved)
                raise
            if self.bucket.committed(key, kind) != done:  # removed while downloading
                raise ArtifactNotFoundError(
                    f"{kind[:-1]} {key} was removed from {self.url} while it was being "
                    "downloaded; run the job again to build it again"
                )

        self.cache.get_or_build(key, download, kind)

    # -- build ----------------------------------------------------------------------------
    def get_or_build(
        self,
        key: str,
        build: Callable[[Path], object],
        kind: Kind = "residuals",
        keep: Collection[str] = (),
    ) -> bool:
        """Make sure ``key`` is published in the bucket and present in the cache,
        building it at most once across machines (with a shared build lock).

        A builder whose lease ran out before its commit (it was paused) publishes
        nothing and tries once more: by then the builder that took over has usually
        published the artifact, which is then fetched.

        Returns:
            True when this call built and published the artifact.

        Raises:
            BuildLockLostError: the lease was lost twice.
        """
        created = _twice(lambda: self._get_or_build(key, build, kind, keep))
        self.evict(keep={key, *keep})
        return created

    def _get_or_build(
        self, key: str, build: Callable[[Path], object], kind: Kind, keep: Collection[str]
    ) -> bool:
        if self._reuse(key, kind):
            return False
        name = f"{kind}/{key}"
        with self._locked(name) as held:
            if self._reuse(key, kind):  # another builder published it while we waited
                return False
            # Cached here, not in the bucket: built again from its sources, never put
            # back (see app.store.stale for why).
            held_here = self.cache.exists(key, kind) and not drop_stale(
                self.cache, key, kind, self.url
            )

            def commit(src: Path) -> bool:
                return publish(self.bucket, src, key, kind, self.hasher, held.token,
                               still_held=held.confirm)  # fmt: skip

            with self.cache.pinned(key):
                if held_here:  # readers here keep their copy: the rebuild goes to the bucket
                    with self.cache.staging.claim(key) as tmp:
                        build(tmp)
                        self.cache.staging.check(tmp)
                        return commit(tmp)
                created = self.cache.get_or_build(key, build, kind, keep, commit=commit)
                if not created:  # another builder's commit came first: use that one
                    self._fetch(key, kind)
        return created

    def _reuse(self, key: str, kind: Kind) -> bool:
        """Whether ``key`` is published; if so it is fetched into the cache."""
        if not self.exists(key, kind):
            return False
        try:
            self._fetch(key, kind)
        except ArtifactNotFoundError:  # removed since: build it again
            return False
        self.touch(key)
        return True

    def publish_staged(
        self,
        key: str,
        stage: Callable[[str], dict[str, tuple[int, str]]],
        kind: Kind = "merged",
        keep: Collection[str] = (),
    ) -> bool:
        """Publish ``key`` from objects that ``stage`` puts under the object prefix it is
        given (server-side copies, small uploads; this builder's own prefix, committed
        in place), returning their (size, sha256) by relative path: nothing passes
        through this node's cache. An artifact already published wins; a failed
        ``stage`` or a lost lease publishes nothing.

        Returns:
            True when this call published.

        Raises:
            BuildLockLostError: the lease was lost twice (once: staged again).
        """
        won = _twice(lambda: self._publish_staged(key, stage, kind))
        self.evict(keep={key, *keep})
        return won

    def _publish_staged(
        self, key: str, stage: Callable[[str], dict[str, tuple[int, str]]], kind: Kind
    ) -> bool:
        name = f"{kind}/{key}"
        if self.exists(key, kind):
            return False
        with self._locked(name) as held:
            if self.exists(key, kind):
                return False
            data = build_prefix(held.token)
            own = self.bucket.name(kind, key, data)
            try:
                held.confirm()
                files = stage(own)
                held.confirm()
            except BaseException:
                with contextlib.suppress(Exception):  # else swept a day later
                    self.bucket.delete_prefix(own + "/")
                raise
            return commit_files(self.bucket, key, kind, data, files, held.token)

    def publish(self, src: Path, key: str, kind: Kind = "residuals") -> bool:
        """Publish a finished directory ``src`` as ``key`` (into the bucket, then the
        cache); an artifact already there wins. Returns True when this call published."""
        return self.get_or_build(key, lambda tmp: copy_tree(src, tmp), kind)

    @contextlib.contextmanager
    def _locked(self, name: str) -> Iterator[Held]:
        if self.lock is None:
            yield Held(0, name)  # the cache's flock deduplicates builders on this node
            return
        with hold(self.lock, self.bucket.name(name), self.lease_s) as held:
            yield held

    # -- integrity ------------------------------------------------------------------------
    def verify(self, key: str) -> ResidualManifest:
        """Download (checking every file) if needed, then check the cached pack."""
        self._fetch(key, "residuals")
        return self.cache.verify(key)

    def verify_merged(self, key: str) -> MergeManifest:
        """Download (checking every file) if needed, then check the cached model."""
        self._fetch(key, "merged")
        return self.cache.verify_merged(key)

    def quarantine(self, key: str, kind: Kind, reason: str) -> Path | None:
        """Hide a corrupt artifact: the cached copy moves to the cache's quarantine and,
        unless the bucket's copy downloads whole again, the bucket's commit marker to
        ``.quarantine/`` (files kept until rebuilt).

        Returns:
            The local quarantine directory (of this copy, or of a corrupt download).
        """
        moved = self.cache.quarantine(key, kind, reason)
        if moved is not None and self._bucket_copy_sound(key, kind):
            return moved  # this node's copy went bad, not the bucket's: downloaded again
        remote = ""
        with contextlib.suppress(ArtifactNotFoundError):
            remote = self.bucket.uncommit(key, kind, reason)
        if moved is None and remote:
            self.cache.log_quarantine(key, kind, remote, reason)
        if moved is None:
            found = sorted(self.cache.root.glob(f".quarantine/{key}.*"), reverse=True)
            moved = next((p for p in found if p.is_dir()), None)
        return moved

    def _bucket_copy_sound(self, key: str, kind: Kind) -> bool:
        """Whether the bucket's copy of ``key`` downloads whole (each file against its
        sha256) into this node's cache: then only the cached copy was damaged (a disk
        fault here), and every other node keeps the artifact."""
        try:
            self._fetch(key, kind)
            try:  # whole as committed; whole as its manifest says too (what failed here)
                if kind == "residuals":
                    self.cache.verify(key)
                elif kind == "merged":
                    self.cache.verify_merged(key)
            except ArtifactCorruptError:
                self.cache.quarantine(key, kind, "the bucket's copy does not match its manifest")
                raise
        except (ArtifactCorruptError, ArtifactNotFoundError, StoreUnavailableError) as exc:
            log.warning("%s %s: the bucket's copy is not sound either (%s)", kind[:-1], key, exc)
            return False
        log.warning("%s %s: the cached copy was damaged; downloaded again", kind[:-1], key)
        return True

    def quarantine_count(self) -> int:
        return self.cache.quarantine_count()

    # -- maintenance ----------------------------------------------------------------------
    def artifacts(self, kind: Kind | None = None) -> list[ArtifactInfo]:
        """Every published artifact; last use and in-use are as seen from this node."""
        out = []
        for k in [kind] if kind else WEIGHT_KINDS:
            cached = {a.key: a for a in self.cache.artifacts(k)}
            for key, (size, stamp) in self.bucket.listing(k).items():
                local = cached.get(key)
                last = max(stamp, local.last_used) if local else stamp
                in_use = bool(local and local.in_use) or self.cache.held(key)
                out.append(ArtifactInfo(key, k, self.path(key, k), size, last, in_use))
        return out

    def usage(self) -> int:
        return sum(a.size for a in self.artifacts())

    def remove(self, key: str, kind: Kind = "residuals") -> None:
        """Delete an artifact from this node's cache (refused while a reader here holds
        it), then from the bucket: its marker first, so readers that start afterwards do
        not find it, then its files. Other nodes keep the copies their caches hold; a
        download under way fails with ``ArtifactNotFoundError`` and caches nothing.

        Raises:
            ArtifactNotFoundError, ArtifactInUseError.
        """
        if self.cache.exists(key, kind):
            self.cache.remove(key, kind)
        with self.cache.unpinned(key) as free:  # a download here under way pins it too
            if not free:
                raise ArtifactInUseError(f"{key} is being read on this node; try again later")
            self.bucket.delete(key, kind)

    def evict(self, keep: str | Collection[str] | None = None) -> list[str]:
        """Trim this node's cache to its budget, and the bucket to ``budget_bytes``
        (oldest use first; the ``keep`` keys, what this node reads, and artifacts
        committed less than ``lease_s`` ago stay: a builder elsewhere is about to read
        what it just published). Uploads not yet committed are never touched."""
        kept = {keep} if isinstance(keep, str) else set(keep or ())
        removed = self.cache.evict(kept)
        if self.budget_bytes is None:
            return removed
        young = time.time() - self.lease_s
        for kind in WEIGHT_KINDS:
            kept |= {k for k, (_, t) in self.bucket.listing(kind).items() if t > young}
        return removed + evict_lru(self, self.budget_bytes, kept)


def _keep_evidence(tmp: Path, bad: str) -> None:
    """Of a corrupt download, keep what tells what it was (its small metadata files, the
    manifest among them) and the damaged file; the rest would only fill the disk."""
    for f in sorted(tmp.rglob("*")):
        if (
            f.is_file()
            and f.suffix != ".json"
            and bad not in (f.relative_to(tmp).as_posix(), f.name)
        ):
            f.unlink()


def _twice(publish: Callable[[], bool]) -> bool:
    """Run ``publish`` again once when its builder lost the lease before committing (it
    was paused): by then the builder that took over has usually published the entry.

    Raises:
        BuildLockLostError: the lease was lost on both attempts.
    """
    try:
        return publish()
    except BuildLockLostError as exc:
        log.warning("%s; trying again", exc)
        return publish()
