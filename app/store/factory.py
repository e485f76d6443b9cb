"""The one place a store is built from ``Settings``: callers take it from here."""

from __future__ import annotations

from pathlib import Path

from app.core.settings import Settings
from app.store.local import LocalStore


def store_from_settings(settings: Settings, root: Path | None = None) -> LocalStore:
    """The configured store (``root`` overrides only the directory, e.g. ``--store``).

    Args:
        settings: process settings; budget, locking and builder lease come from here.
        root: a store directory other than ``settings.models_cache_dir``.

    Returns:
        A ``LocalStore`` honouring every store setting.
    """
    budget = settings.store_budget_gb
    return LocalStore(
        root or settings.models_cache_dir,
        int(budget * 1024**3) if budget is not None else None,
        locking=settings.store_locking,
        lease_s=settings.store_lease_s,
    )
