"""Pin a job's references once, at validation, so every step sees the same inputs."""

from __future__ import annotations

from collections.abc import Collection
from pathlib import Path

from app.jobs.models import MergeSpec
from app.residuals.refs import ModelRef, resolve_ref
from app.store.local import LocalStore

PINNED_FIELDS = ("base", "instruct", "target")


def pin_refs(
    spec: MergeSpec, store_root: Path, trusted_code: Collection[str] = ()
) -> dict[str, str]:
    """The spec's refs that can move, resolved: ``hf:org/name@main`` to
    ``hf:org/name@<commit>`` (downloading it into the store's sources), a residual key
    prefix to the full key. Local directories are identified by content later.
    ``trusted_code``: the administrator's allowlist of model code hashes, as for the CLI.

    Raises:
        RealignError subclasses: a ref that does not resolve.
    """
    pins: dict[str, str] = {}
    for field in PINNED_FIELDS:
        text = getattr(spec, field)
        if text is None:
            continue
        ref = ModelRef.parse(text)
        if ref.kind == "hf":
            pins[field] = resolve_ref(ref, store_root / "sources", trusted_code=trusted_code).ref
    if spec.residual is not None and "/" not in spec.residual:
        pins["residual"] = LocalStore(store_root).resolve(spec.residual)
    return pins
