"""The store interface every backend implements (``LocalStore``, ``ObjectStore``).

Callers take a store from :func:`app.store.factory.store_from_settings` and type
against :class:`Store`. Artifacts are content-addressed (``residuals/<key>``,
``merged/<key>``, ``evals/<key>``) and always read from a local directory: a remote
backend keeps a node-local read-through cache, and ``using`` hands out its path pinned
against eviction.

An ``evals`` artifact is one sealed JSON file, :data:`EVAL_FILE`: a model's score on one
suite (see :mod:`app.evals.stored`). Such records are a few hundred bytes: they are kept
whatever the budget (eviction, ``realign ls`` and ``usage`` count the weights only).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol, runtime_checkable

from app.residuals.hashing import FileHasher
from app.residuals.manifest import MergeManifest, ResidualManifest
from app.store.s3 import S3Config

Kind = Literal["residuals", "merged", "evals"]
# What the budget counts and evicts, and ``artifacts()`` lists by default.
WEIGHT_KINDS: tuple[Kind, ...] = ("residuals", "merged")
EVAL_FILE = "realign-eval.json"


@dataclass(frozen=True)
class ArtifactInfo:
    """One stored artifact, as listed by ``realign ls``."""

    key: str
    kind: Kind
    path: Path
    size: int
    last_used: float
    in_use: bool


@runtime_checkable
class Store(Protocol):
    """A content-addressed artifact store.

    ``root`` is a local directory (the store itself, or a remote store's node cache):
    ``root/sources`` holds downloaded inputs, ``path(key, kind)`` where an artifact is
    read from once it is local.
    """

    root: Path
    hasher: FileHasher
    budget_bytes: int | None
    s3: S3Config  # how ``s3://`` model refs are fetched

    def path(self, key: str, kind: Kind = "residuals") -> Path:
        """The local directory of ``key`` (present once built, fetched or pinned)."""
        ...

    def exists(self, key: str, kind: Kind = "residuals") -> bool:
        """Whether ``key`` is published (a remote store: its manifest exists)."""
        ...

    def resolve(self, prefix: str, kind: Kind = "residuals") -> str:
        """Expand a unique key prefix to the full key (ArtifactNotFoundError,
        AmbiguousKeyError)."""
        ...

    def using(self, key: str, kind: Kind = "residuals") -> contextlib.AbstractContextManager[Path]:
        """Hold ``key`` for reading (fetched first if remote); eviction and removal
        leave it alone meanwhile."""
        ...

    def keys(self, kind: Kind, prefix: str = "") -> list[str]:
        """The published keys of ``kind`` that start with ``prefix``, sorted."""
        ...

    def read_text(self, key: str, name: str, kind: Kind = "residuals") -> str:
        """One small file of an artifact (a manifest) without fetching the rest."""
        ...

    def touch(self, key: str) -> None:
        """Record a use of ``key`` (LRU order)."""
        ...

    def get_or_build(
        self,
        key: str,
        build: Callable[[Path], object],
        kind: Kind = "residuals",
        keep: Collection[str] = (),
    ) -> bool:
        """Make sure ``key`` is published and local, building it at most once under a
        leased build lock; True when this call built it."""
        ...

    def publish(self, src: Path, key: str, kind: Kind = "residuals") -> bool:
        """Publish a finished directory as ``key`` (an artifact already there wins);
        True when this call published it."""
        ...

    def verify(self, key: str) -> ResidualManifest:
        """Check a residual pack's files against their recorded checksums
        (ArtifactCorruptError)."""
        ...

    def verify_merged(self, key: str) -> MergeManifest:
        """Check a merged model's files against their recorded checksums
        (ArtifactCorruptError)."""
        ...

    def quarantine(self, key: str, kind: Kind, reason: str) -> Path | None:
        """Move a corrupt artifact out of view (kept) and log it."""
        ...

    def quarantine_count(self) -> int:
        """How many artifacts were ever quarantined here."""
        ...

    def artifacts(self, kind: Kind | None = None) -> list[ArtifactInfo]:
        """Every published artifact of ``kind`` (None: of the :data:`WEIGHT_KINDS`)."""
        ...

    def usage(self) -> int:
        """Bytes held by published artifacts."""
        ...

    def remove(self, key: str, kind: Kind = "residuals") -> None:
        """Delete an artifact unless a reader holds it (ArtifactInUseError)."""
        ...

    def evict(self, keep: str | Collection[str] | None = None) -> list[str]:
        """Remove least recently used artifacts beyond the budget, sparing ``keep``."""
        ...


def evict_lru(store: Store, budget_bytes: int, kept: Collection[str]) -> list[str]:
    """Remove ``store``'s least recently used artifacts until it fits ``budget_bytes``,
    sparing the ``kept`` keys and what is being read; the removed keys."""
    from app.core.errors import ArtifactInUseError, ArtifactNotFoundError

    items = sorted(store.artifacts(), key=lambda a: a.last_used)
    total, removed = sum(a.size for a in items), []
    for item in items:
        if total <= budget_bytes:
            break
        if item.key in kept or item.in_use:
            continue
        with contextlib.suppress(ArtifactInUseError, ArtifactNotFoundError):
            store.remove(item.key, item.kind)
            total -= item.size
            removed.append(item.key)
    return removed
