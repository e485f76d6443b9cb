"""LocalStore: residual packs and merged models under ``models_cache/``.

Publication is atomic (a leased staging dir on the same filesystem, fsync, rename;
the first rename wins, a later builder discards only its own dir and uses the
winner's). With ``flock`` a per-key lock makes concurrent builders do the work
once, and readers hold a shared lock that eviction and removal respect; without
it (NFS, some container volumes) builds stay correct, only not deduplicated.
Artifacts found corrupt are moved to ``.quarantine/`` (kept, not deleted) and
counted. Last use drives LRU eviction.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import shutil
import time
import uuid
from collections.abc import Callable, Collection, Iterator
from pathlib import Path
from typing import Literal, get_args

from app.core.errors import (
    ArtifactInUseError,
    ArtifactNotFoundError,
    OutputExistsError,
)
from app.residuals.hashing import FileHasher
from app.residuals.integrity import ReadVerifier
from app.residuals.manifest import (
    FileEntry,
    MergeManifest,
    ResidualManifest,
    read_merge_manifest,
    read_residual_manifest,
)
from app.residuals.publish import publish
from app.store.base import WEIGHT_KINDS, ArtifactInfo, Kind, evict_lru
from app.store.keys import pick_key
from app.store.quarantine import (
    QUARANTINE,
    log_quarantine,
    quarantine_count,
    quarantine_dir,
)
from app.store.s3 import S3Config
from app.store.staging import DEFAULT_LEASE_S, StagingArea, copy_tree

__all__ = ["QUARANTINE", "ArtifactInfo", "Kind", "LocalStore", "Locking", "copy_tree"]
Locking = Literal["flock", "none"]
# flock answers these where the file system cannot lock (NFS without lockd, FUSE).
_NO_FLOCK = frozenset({errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL})
log = logging.getLogger(__name__)


class LocalStore:
    """A content-addressed store rooted at ``root``.

    Args:
        root: store directory (created if missing).
        budget_bytes: evict least recently used artifacts beyond this size.
        locking: ``flock`` (builders of one key wait for each other, readers pin
            artifacts against eviction) or ``none`` where file locks do not work
            (NFS): builds are still correct, concurrent ones just do the work twice.
        lease_s: how long a builder's claim on its staging dir holds unrenewed.
        s3: how to reach S3 for ``s3://`` model refs (endpoint; credentials come from
            the standard AWS chain).
    """

    def __init__(
        self,
        root: Path,
        budget_bytes: int | None = None,
        *,
        locking: Locking = "flock",
        lease_s: float = DEFAULT_LEASE_S,
        s3: S3Config | None = None,
    ) -> None:
        self.root = root
        self.s3 = s3 or S3Config()
        self.budget_bytes = budget_bytes
        self.locking = locking
        for sub in (*get_args(Kind), "sources", ".locks", ".access", QUARANTINE):
            (root / sub).mkdir(parents=True, exist_ok=True)
        self.staging = StagingArea(root / ".staging", lease_s)
        self.staging.sweep()  # what builders that died left, once their lease ran out
        self.hasher = FileHasher(root / ".hashes.sqlite")

    # -- lookup ---------------------------------------------------------------------------
    def path(self, key: str, kind: Kind = "residuals") -> Path:
        return self.root / kind / key

    def exists(self, key: str, kind: Kind = "residuals") -> bool:
        return self.path(key, kind).is_dir()

    def resolve(self, prefix: str, kind: Kind = "residuals") -> str:
        """Expand a unique key prefix (like git) to the full key.

        Raises:
            ArtifactNotFoundError, AmbiguousKeyError.
        """
        return pick_key(prefix, self.keys(kind, prefix), kind, self.root)

    def keys(self, kind: Kind, prefix: str = "") -> list[str]:
        return sorted(p.name for p in (self.root / kind).glob(f"{prefix}*") if p.is_dir())

    # -- locks ----------------------------------------------------------------------------
    @contextlib.contextmanager
    def _flock(self, name: str, mode: int) -> Iterator[bool]:
        if self.locking == "none":
            yield True
            return
        fd = os.open(self.root / ".locks" / name, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, mode)
            except BlockingIOError:
                yield False
                return
            except OSError as exc:
                if exc.errno not in _NO_FLOCK:
                    raise
                # NFS without lockd, some container volumes: work as with locking="none"
                # (unique staging names, rename-based publish), and say so once.
                log.warning(
                    "store %s: flock is not available (%s); working without locks as with "
                    "REALIGN_STORE_LOCKING=none",
                    self.root,
                    os.strerror(exc.errno or 0),
                )
                self.locking = "none"
            yield True
        finally:
            os.close(fd)  # closing drops the lock

    @contextlib.contextmanager
    def using(self, key: str, kind: Kind = "residuals") -> Iterator[Path]:
        """Hold ``key`` for reading: eviction and removal leave it alone meanwhile."""
        with self._flock(f"{key}.use", fcntl.LOCK_SH):
            path = self.path(key, kind)
            if not path.is_dir():
                raise ArtifactNotFoundError(f"{kind[:-1]} {key} is not in {self.root}")
            self.touch(key)
            yield path

    def read_text(self, key: str, name: str, kind: Kind = "residuals") -> str:
        """One small file of an artifact (a manifest).

        Raises:
            ArtifactNotFoundError: no such artifact or file.
        """
        try:
            return (self.path(key, kind) / name).read_text()
        except FileNotFoundError:
            raise ArtifactNotFoundError(f"{kind[:-1]} {key} has no {name} in {self.root}") from None

    def pinned(self, key: str) -> contextlib.AbstractContextManager[bool]:
        """Pin ``key`` against eviction and removal (whether or not it exists yet)."""
        return self._flock(f"{key}.use", fcntl.LOCK_SH)

    def unpinned(self, key: str) -> contextlib.AbstractContextManager[bool]:
        """Hold off new pins of ``key`` while the block runs; yields False (and holds
        nothing) when a reader here pins it, cached or still downloading."""
        return self._flock(f"{key}.use", fcntl.LOCK_EX | fcntl.LOCK_NB)

    def held(self, key: str) -> bool:
        """Whether a reader here pins ``key`` now (cached, or still downloading)."""
        if not (self.root / ".locks" / f"{key}.use").exists():
            return False  # never pinned on this node
        with self.unpinned(key) as free:
            return not free

    def touch(self, key: str) -> None:
        (self.root / ".access" / key).touch()

    # -- build ----------------------------------------------------------------------------
    def get_or_build(
        self,
        key: str,
        build: Callable[[Path], object],
        kind: Kind = "residuals",
        keep: Collection[str] = (),
        commit: Callable[[Path], bool] | None = None,
    ) -> bool:
        """Make sure ``key`` exists, building it at most once across processes.

        ``build`` fills an empty staging directory; it is published atomically when
        ``build`` returns and discarded when it raises. Eviction after a build spares
        the new artifact and the ``keep`` keys (artifacts built alongside it).

        Args:
            commit: called with the built directory before anyone here can see it (an
                object store commits it to its bucket); False = another builder's
                copy was committed instead, and this one is discarded unpublished.

        Returns:
            True when this call built and published the artifact, False when it was
            already there (or ``commit`` said another copy won).
        """
        if self.exists(key, kind):
            self.touch(key)
            return False
        with self._flock(f"{key}.build", fcntl.LOCK_EX):
            if self.exists(key, kind):  # somebody else built it while we waited
                self.touch(key)
                return False
            self.staging.sweep()  # what dead builders left, once their lease ran out
            with self.staging.claim(key) as tmp:
                build(tmp)
                self.staging.check(tmp)
                if commit is not None and not commit(tmp):
                    return False
                self._publish(tmp, key, kind)
            self.touch(key)
        self.evict(keep={key, *keep})
        return True

    def publish(self, src: Path, key: str, kind: Kind = "residuals") -> bool:
        """Publish a finished directory ``src`` (copied; hard links where possible) as
        ``key``; an artifact already there wins. Returns True when this call published."""
        return self.get_or_build(key, lambda tmp: copy_tree(src, tmp), kind)

    def _publish(self, tmp: Path, key: str, kind: Kind) -> None:
        """Rename ``tmp`` into place; when a concurrent builder got there first (no
        working lock), keep the winner's artifact (same key, same content) and let
        ``tmp`` be discarded."""
        try:
            publish(tmp, self.path(key, kind))
        except OutputExistsError:
            pass
        except OSError as exc:
            if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST) or not self.exists(key, kind):
                raise

    # -- integrity ------------------------------------------------------------------------
    def verify_files(self, key: str, kind: Kind, files: dict[str, FileEntry]) -> None:
        """Hash every file listed in ``files`` (those with a recorded checksum).

        Raises:
            ArtifactCorruptError: a file is missing, resized or altered.
        """
        path = self.path(key, kind)
        expected = {path / n: (e.size, e.checksum) for n, e in files.items() if e.checksum}
        ReadVerifier(expected, key).finish()

    def verify(self, key: str) -> ResidualManifest:
        """Check every file of a residual pack against the checksum its manifest records.

        Raises:
            ArtifactCorruptError: a file is missing, resized or altered.
        """
        with self.using(key) as path:
            manifest = read_residual_manifest(path)
            self.verify_files(key, "residuals", manifest.files)
        return manifest

    def verify_merged(self, key: str) -> MergeManifest:
        """Check a stored merged model's files (weights, config, tokenizer) against the
        checksum its ``realign.json`` records.

        Raises:
            ArtifactCorruptError: a file is missing, resized or altered.
        """
        with self.using(key, "merged") as path:
            manifest = read_merge_manifest(path)
            self.verify_files(key, "merged", {**manifest.files, **manifest.other_files})
        return manifest

    def quarantine(self, key: str, kind: Kind, reason: str) -> Path | None:
        """Move a corrupt artifact out of view into ``.quarantine/<key>.<time>`` (kept
        for inspection) and log it.

        Returns:
            Where it went; None when it was no longer there (another process moved it).
        """
        moved = self.quarantine_dir(self.path(key, kind), key, kind, reason)
        if moved is not None:
            (self.root / ".access" / key).unlink(missing_ok=True)
        return moved

    def quarantine_dir(
        self, src: Path, key: str, kind: Kind, reason: str, *, log: bool = True
    ) -> Path | None:
        """Move directory ``src`` (a corrupt copy of ``key``) into ``.quarantine/``;
        None when it is gone. ``log`` counts it in the quarantine log."""
        return quarantine_dir(self.root / QUARANTINE, src, key, kind, reason, log=log)

    def log_quarantine(self, key: str, kind: Kind, where: str, reason: str) -> None:
        """Count one quarantined artifact (``where`` it went) in the quarantine log."""
        log_quarantine(self.root / QUARANTINE, key, kind, where, reason)

    def quarantine_count(self) -> int:
        """How many artifacts were ever quarantined in this store (a counter)."""
        return quarantine_count(self.root / QUARANTINE)

    # -- maintenance ----------------------------------------------------------------------
    def artifacts(self, kind: Kind | None = None) -> list[ArtifactInfo]:
        out = []
        for k in [kind] if kind else WEIGHT_KINDS:
            for path in sorted((self.root / k).iterdir()):
                if path.is_dir():
                    with contextlib.suppress(FileNotFoundError):  # removed meanwhile
                        out.append(self._info(path.name, k))
        return out

    def _info(self, key: str, kind: Kind) -> ArtifactInfo:
        path = self.path(key, kind)
        size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
        access = self.root / ".access" / key
        last = access.stat().st_mtime if access.exists() else path.stat().st_mtime
        with self._flock(f"{key}.use", fcntl.LOCK_EX | fcntl.LOCK_NB) as free:
            in_use = not free
        return ArtifactInfo(key, kind, path, size, last, in_use)

    def usage(self) -> int:
        return sum(a.size for a in self.artifacts())

    def remove(self, key: str, kind: Kind = "residuals") -> None:
        """Delete an artifact unless a reader holds it.

        Raises:
            ArtifactNotFoundError, ArtifactInUseError.
        """
        with self._flock(f"{key}.use", fcntl.LOCK_EX | fcntl.LOCK_NB) as free:
            if not free:
                raise ArtifactInUseError(f"{key} is in use by a running job; try again later")
            path = self.path(key, kind)
            if not path.is_dir():
                raise ArtifactNotFoundError(f"no {kind[:-1]} {key} in {self.root}")
            trash = self.root / ".staging" / f"trash.{key}.{uuid.uuid4().hex}"
            os.replace(path, trash)  # gone from view at once, then deleted
            shutil.rmtree(trash, ignore_errors=True)
            (self.root / ".access" / key).unlink(missing_ok=True)

    def evict(self, keep: str | Collection[str] | None = None) -> list[str]:
        """Remove least recently used artifacts until the store fits its budget; the
        ``keep`` key(s) stay whatever their age."""
        kept = {keep} if isinstance(keep, str) else set(keep or ())
        if self.budget_bytes is None:
            return []
        return evict_lru(self, self.budget_bytes, kept)

    def age(self, key: str) -> float:
        access = self.root / ".access" / key
        return time.time() - access.stat().st_mtime if access.exists() else 0.0
