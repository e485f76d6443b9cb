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
import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from app.core.errors import (
    AmbiguousKeyError,
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
from app.store.staging import DEFAULT_LEASE_S, StagingArea

Kind = Literal["residuals", "merged"]
Locking = Literal["flock", "none"]
QUARANTINE = ".quarantine"
_QUARANTINE_LOG = "quarantine.log"
# flock answers these where the file system cannot lock (NFS without lockd, FUSE).
_NO_FLOCK = frozenset({errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL})
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ArtifactInfo:
    """One stored artifact, as listed by ``realign ls``."""

    key: str
    kind: Kind
    path: Path
    size: int
    last_used: float
    in_use: bool


class LocalStore:
    """A content-addressed store rooted at ``root``.

    Args:
        root: store directory (created if missing).
        budget_bytes: evict least recently used artifacts beyond this size.
        locking: ``flock`` (builders of one key wait for each other, readers pin
            artifacts against eviction) or ``none`` where file locks do not work
            (NFS): builds are still correct, concurrent ones just do the work twice.
        lease_s: how long a builder's claim on its staging dir holds unrenewed.
    """

    def __init__(
        self,
        root: Path,
        budget_bytes: int | None = None,
        *,
        locking: Locking = "flock",
        lease_s: float = DEFAULT_LEASE_S,
    ) -> None:
        self.root = root
        self.budget_bytes = budget_bytes
        self.locking = locking
        for sub in ("residuals", "merged", "sources", ".locks", ".access", QUARANTINE):
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
        matches = sorted(p.name for p in (self.root / kind).glob(f"{prefix}*") if p.is_dir())
        if not matches:
            raise ArtifactNotFoundError(
                f"no {kind[:-1]} with key {prefix!r} in {self.root}; `realign ls` lists them"
            )
        if len(matches) > 1 and prefix not in matches:
            raise AmbiguousKeyError(
                f"key prefix {prefix!r} matches {len(matches)} artifacts; give more characters"
            )
        return prefix if prefix in matches else matches[0]

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

    def touch(self, key: str) -> None:
        (self.root / ".access" / key).touch()

    # -- build ----------------------------------------------------------------------------
    def get_or_build(
        self,
        key: str,
        build: Callable[[Path], object],
        kind: Kind = "residuals",
        keep: Collection[str] = (),
    ) -> bool:
        """Make sure ``key`` exists, building it at most once across processes.

        ``build`` fills an empty staging directory; it is published atomically when
        ``build`` returns and discarded when it raises. Eviction after a build spares
        the new artifact and the ``keep`` keys (artifacts built alongside it).

        Returns:
            True when this call built the artifact, False when it was already there.
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
                self._publish(tmp, key, kind)
            self.touch(key)
        self.evict(keep={key, *keep})
        return True

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
        """Hash every file listed in ``files`` (those with a recorded sha256).

        Raises:
            ArtifactCorruptError: a file is missing, resized or altered.
        """
        path = self.path(key, kind)
        expected = {path / n: (e.size, e.sha256) for n, e in files.items() if e.sha256}
        ReadVerifier(expected, key).finish()

    def verify(self, key: str) -> ResidualManifest:
        """Check every file of a residual pack against the sha256 in its manifest.

        Raises:
            ArtifactCorruptError: a file is missing, resized or altered.
        """
        with self.using(key) as path:
            manifest = read_residual_manifest(path)
            self.verify_files(key, "residuals", manifest.files)
        return manifest

    def verify_merged(self, key: str) -> MergeManifest:
        """Check a stored merged model's files (weights, config, tokenizer) against the
        sha256 in its ``realign.json``.

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
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        dest = self.root / QUARANTINE / f"{key}.{stamp}.{uuid.uuid4().hex[:6]}"
        try:
            os.replace(self.path(key, kind), dest)
        except FileNotFoundError:
            return None
        (self.root / ".access" / key).unlink(missing_ok=True)
        line = {"time": time.time(), "key": key, "kind": kind, "path": str(dest)}
        with (self.root / QUARANTINE / _QUARANTINE_LOG).open("a") as log:
            log.write(json.dumps({**line, "reason": reason}) + "\n")
        return dest

    def quarantine_count(self) -> int:
        """How many artifacts were ever quarantined in this store (a counter)."""
        log = self.root / QUARANTINE / _QUARANTINE_LOG
        with contextlib.suppress(FileNotFoundError), log.open() as fh:
            return sum(1 for _ in fh)
        return 0

    # -- maintenance ----------------------------------------------------------------------
    def artifacts(self, kind: Kind | None = None) -> list[ArtifactInfo]:
        kinds: list[Kind] = [kind] if kind else ["residuals", "merged"]
        out = []
        for k in kinds:
            for path in sorted((self.root / k).iterdir()):
                if path.is_dir():
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
        items = sorted(self.artifacts(), key=lambda a: a.last_used)
        total = sum(a.size for a in items)
        removed = []
        for item in items:
            if total <= self.budget_bytes:
                break
            if item.key in kept or item.in_use:
                continue
            with contextlib.suppress(ArtifactInUseError, ArtifactNotFoundError):
                self.remove(item.key, item.kind)
                total -= item.size
                removed.append(item.key)
        return removed

    def age(self, key: str) -> float:
        access = self.root / ".access" / key
        return time.time() - access.stat().st_mtime if access.exists() else 0.0
