"""Pin a job's references once, at validation, so every step sees the same inputs."""

from __future__ import annotations

import re
from collections.abc import Collection, Mapping

from app.jobs.models import MergeSpec
from app.residuals.refs import ModelRef
from app.store.base import Store
from app.store.inputs import pin_input

PINNED_FIELDS = ("base", "instruct", "target")
_ITEM = re.compile(r"residuals\[(\d+)\]\.(key|base|instruct)")


def pin_refs(spec: MergeSpec, store: Store, trusted_code: Collection[str] = ()) -> dict[str, str]:
    """The spec's refs that can move, resolved: ``hf:org/name@main`` to
    ``hf:org/name@<commit>`` (configs only: the weights are downloaded by the merge,
    after its free-space check), ``s3://bucket/prefix`` to
    ``s3://bucket/prefix@sha256:<content digest>`` (downloaded into the store's
    sources), a residual key prefix to the full key. Local directories are identified
    by content later.

    Raises:
        RealignError subclasses: a ref that does not resolve.
    """
    pins: dict[str, str] = {}
    for field in PINNED_FIELDS:
        text = getattr(spec, field)
        if text is None:
            continue
        if ModelRef.parse(text).kind in ("hf", "s3"):
            pins[field] = pin_input(text, store, trusted_code)
    if spec.residual is not None and "/" not in spec.residual:
        pins["residual"] = store.resolve(spec.residual)
    for i, item in enumerate(spec.residuals):
        for field in ("base", "instruct"):
            text = getattr(item, field)
            if text is not None and ModelRef.parse(text).kind in ("hf", "s3"):
                pins[f"residuals[{i}].{field}"] = pin_input(text, store, trusted_code)
        if item.key is not None and "/" not in item.key:
            pins[f"residuals[{i}].key"] = store.resolve(item.key)
    return pins


def apply_pins(spec: MergeSpec, pins: Mapping[str, str]) -> MergeSpec:
    """``spec`` with the refs of :func:`pin_refs` put in (``residuals[i].field`` ones
    into that residual)."""
    items = list(spec.residuals)
    update: dict[str, object] = {}
    for name, ref in pins.items():
        found = _ITEM.fullmatch(name)
        if found is None:
            update[name] = ref
            continue
        i = int(found[1])
        items[i] = items[i].model_copy(update={found[2]: ref})
    if items:
        update["residuals"] = tuple(items)
    return spec.model_copy(update=update) if update else spec
