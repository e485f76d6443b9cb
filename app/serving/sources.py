"""Where a serving process gets a model's weights: from the store, by the keys its catalog
entry carries (never a path on the worker that built it).

With an object store the artifact is downloaded into this node's cache
(``REALIGN_MODELS_CACHE_DIR``), each file checked against the sha256 of its commit
marker as it arrives, and pinned there while an engine holds it; with a local store
(one box, or a shared volume) it is read where it is, pinned, without a copy.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Collection, Iterator

from app.engines.base import InlineMerge
from app.engines.source import LocalModel, ModelSource
from app.handoff.entry import ModelEntry
from app.store.base import Store
from app.store.inputs import resolve_input


def source_of(entry: ModelEntry, store: Store, trusted_code: Collection[str] = ()) -> ModelSource:
    """What to load for ``entry``: its merged model ``merged/<key>``, or for an in-engine
    merge its residual pack and target.

    Args:
        entry: the catalog entry (store keys and model refs).
        store: this process's store (from ``store_from_settings``).
        trusted_code: code hashes allowed in a target that ships code.
    """
    if entry.merged_key:
        opener = functools.partial(_merged, store, entry.merged_key)
        return ModelSource(entry.id, f"merged/{entry.merged_key}", opener)
    ref = f"residuals/{entry.residual_key} + {entry.target} * {entry.alpha!r}"
    return ModelSource(entry.id, ref, functools.partial(_inline, store, entry, trusted_code))


@contextlib.contextmanager
def _merged(store: Store, key: str) -> Iterator[LocalModel]:
    with store.using(key, "merged") as path:
        yield LocalModel(path)


@contextlib.contextmanager
def _inline(store: Store, entry: ModelEntry, trusted_code: Collection[str]) -> Iterator[LocalModel]:
    with store.using(entry.residual_key, "residuals") as pack:
        # The target is a model ref (a directory, hf:…@commit, s3://…@sha256:…), made
        # local here as the worker did; downloads land in this node's sources/.
        target = resolve_input(entry.target, store, trusted_code)
        yield LocalModel(target.path, InlineMerge(pack, target.path, entry.alpha))
