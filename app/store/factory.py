"""The one place a store is built from ``Settings``: callers take it from here."""

from __future__ import annotations

from pathlib import Path

from app.core.settings import Settings
from app.store.base import Store
from app.store.local import LocalStore
from app.store.locks import BuildLock
from app.store.objects import ObjectStore
from app.store.s3 import S3Config


def store_from_settings(
    settings: Settings, root: Path | None = None, lock: BuildLock | None = None
) -> Store:
    """The configured store (``root`` overrides it with a local directory, e.g.
    ``--store``).

    Args:
        settings: process settings; location, budgets, locking and builder lease come
            from here, and nowhere below.
        root: a local store directory instead of the configured store.
        lock: the build lock an object store's builders share across machines; the
            caller provides it (the job side: ``app.jobs.locks.build_lock``). None =
            builds are deduplicated per node only (a local store needs none).

    Returns:
        A ``LocalStore`` (``REALIGN_STORE_URL`` empty, or ``root`` given) or an
        ``ObjectStore`` whose node cache is ``REALIGN_MODELS_CACHE_DIR``.
    """
    s3 = S3Config(endpoint_url=settings.s3_endpoint_url or None)
    local = settings.models_cache_dir if root is None else root
    if root is not None or not settings.store_url:
        return LocalStore(
            local,
            _bytes(settings.store_budget_gb),
            locking=settings.store_locking,
            lease_s=settings.store_lease_s,
            s3=s3,
        )
    cache = LocalStore(
        local,
        _bytes(settings.store_cache_budget_gb),
        locking=settings.store_locking,
        lease_s=settings.store_lease_s,
        s3=s3,
    )
    return ObjectStore(
        settings.store_url,
        cache,
        s3=s3,
        lock=lock,
        lease_s=settings.store_lease_s,
        budget_bytes=_bytes(settings.store_budget_gb),
    )


def _bytes(gb: float | None) -> int | None:
    return int(gb * 1024**3) if gb is not None else None
