"""A node's cached copy of an artifact its bucket no longer lists, before a build.

Such a copy is never committed back. The bucket records no reason for an absence:
``realign rm`` (often of a bad artifact), the bucket budget, the quarantine of a
corrupt copy and a lifecycle rule all leave the same nothing behind, so putting the
copy back could resurrect what was removed on purpose, or publish bytes that rotted on
this node's disk under checksums computed afresh from them. Whoever asks for a build
holds the sources, so the absence is taken as "build again from the sources": the
copy leaves the cache first, quarantined (kept, counted) when its files no longer
match its manifest, else deleted; a copy that a reader on this node holds stays for
that reader, and the rebuild is published to the bucket only.
"""

from __future__ import annotations

import logging

from app.core.errors import ArtifactCorruptError, ArtifactInUseError, ArtifactNotFoundError
from app.residuals.manifest import read_sealed
from app.store.base import EVAL_FILE, Kind
from app.store.local import LocalStore

log = logging.getLogger(__name__)


def drop_stale(cache: LocalStore, key: str, kind: Kind, url: str) -> bool:
    """Take the cached copy of ``key`` (not in the bucket at ``url``) out of ``cache``.

    Returns:
        False when a reader on this node holds the copy and it is intact: it stays.
    """
    try:
        if kind == "merged":
            cache.verify_merged(key)
        elif kind == "evals":
            read_sealed(cache.path(key, kind) / EVAL_FILE)
        else:
            cache.verify(key)
    except (ArtifactCorruptError, FileNotFoundError) as exc:
        reason = f"not in {url}, and the cached copy is damaged: {exc}"
        moved = cache.quarantine(key, kind, reason)
        log.warning("%s %s: %s; kept at %s, building it again", kind[:-1], key, reason, moved)
        return True
    except ArtifactNotFoundError:  # another process here took it out meanwhile
        return True
    try:
        cache.remove(key, kind)
    except ArtifactInUseError:
        return False
    except ArtifactNotFoundError:
        pass
    log.info("%s %s: not in %s; cached copy dropped, building it again", kind[:-1], key, url)
    return True
