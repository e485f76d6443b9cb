"""The inputs of one task of a split merge, as the task's own node reaches them.

A shard task or the final task may run on any machine, so none opens a path of the
node that planned the split: the plan carries the residual key and the pinned target
ref, and each task resolves them through its own store.

- Object store: partial views (:mod:`app.store.views`) in the task's scratch
  directory. Every task fetches the small files and the safetensors headers; a shard
  task then fetches, whole, the pack files and target files its output shard reads,
  each checked against its sha256 as it lands (the pack's commit marker, the sizes and
  hashes the pinned target was identified by), and no other tensor bytes.
- Local store (a file system every worker mounts): the pack where the store keeps it,
  the target at its path or resolved into the shared store's sources.

An ``hf:`` target is resolved through the node's store: its pinned snapshot is
downloaded once per node, whole.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from app.core.errors import ArtifactCorruptError, InvalidRefError
from app.core.settings import Settings
from app.jobs.shard_records import SplitPlan
from app.residuals.apply_shard import shard_reads
from app.residuals.checkpoint import Checkpoint
from app.residuals.refs import ModelRef
from app.residuals.space import ensure_space
from app.store.base import Store
from app.store.inputs import resolve_input
from app.store.objects import ObjectStore
from app.store.views import RemoteView, model_view, pack_view


@dataclass(frozen=True)
class Inputs:
    """What a task reads: the pack directory, the open target, and the bytes fetched
    for them (0 on a shared file system)."""

    pack_dir: Path
    target: Checkpoint
    fetched: int
    pack_checked: bool  # every pack file the task reads was checked whole on arrival


@contextlib.contextmanager
def pack_headers(store: Store, key: str, scratch: Path) -> Iterator[tuple[Path, RemoteView | None]]:
    """The stored pack ``key`` to plan with: in an object store a view of its small
    files and headers in ``scratch`` (no tensor bytes), else the stored directory."""
    if isinstance(store, ObjectStore):
        view = pack_view(store.bucket, key, scratch / "pack")
        yield view.root, view
        return
    with store.using(key) as path:
        yield path, None


def target_dir(
    plan: SplitPlan, store: Store, settings: Settings, scratch: Path
) -> tuple[Path, RemoteView | None]:
    """Where the split's target is on this node (a view of it, for an ``s3://`` target
    of an object store).

    Raises:
        InvalidRefError: a local target with an object store (other nodes cannot read it).
        RealignError subclasses: the ref does not resolve.
    """
    ref = ModelRef.parse(plan.target)
    if ref.kind == "s3" and isinstance(store, ObjectStore):
        view = model_view(store.s3, plan.target, plan.target_src, scratch / "target")
        return view.root, view
    if ref.kind == "local":
        if isinstance(store, ObjectStore):
            raise InvalidRefError(
                f"{plan.target}: a split merge on an object store needs an s3:// or hf: "
                "target that every node can fetch, not a local path; submit it again"
            )
        return Path(plan.target), None
    return resolve_input(plan.target, store, settings.trusted_code_sha256).path, None


@contextlib.contextmanager
def open_inputs(
    plan: SplitPlan, store: Store, settings: Settings, scratch: Path, index: int | None
) -> Iterator[Inputs]:
    """The split's pack and target for output shard ``index`` (None: the final task,
    which reads headers only), fetched into ``scratch`` where they are remote.

    Raises:
        ArtifactCorruptError: a fetched file does not match its sha256.
        InsufficientStorageError: no room in ``scratch`` for the files to fetch.
    """
    with pack_headers(store, plan.residual_key, scratch) as (pack_dir, pview):
        tdir, tview = target_dir(plan, store, settings, scratch)
        views = [v for v in (pview, tview) if v is not None]
        if index is not None and views:
            _fill(plan, index, pack_dir, tdir, pview, tview, scratch)
        with Checkpoint.open(tdir) as target:
            if index is not None and views:
                _check_fetched(plan, index, pack_dir, target, pview, tview)
            fetched = sum(v.fetched for v in views)
            yield Inputs(pack_dir, target, fetched, pack_checked=pview is not None)


def _fill(
    plan: SplitPlan,
    index: int,
    pack_dir: Path,
    tdir: Path,
    pview: RemoteView | None,
    tview: RemoteView | None,
    scratch: Path,
) -> None:
    with Checkpoint.open(tdir) as target:
        packs, targets = shard_reads(pack_dir, target, plan.alpha, index, plan.max_shard_bytes)
    need = plan.nbytes[index]
    for view, names in ((pview, packs), (tview, targets)):
        if view is not None:
            need += sum(view.files[n].size for n in names)
    ensure_space([(scratch, need)])
    if pview is not None:
        pview.fill(packs)
    if tview is not None:
        tview.fill(targets)


def _check_fetched(
    plan: SplitPlan,
    index: int,
    pack_dir: Path,
    target: Checkpoint,
    pview: RemoteView | None,
    tview: RemoteView | None,
) -> None:
    """Refuse to read a file that is only a header here: the headers of the files just
    fetched (checked) must send this shard to the same files as those planned with."""
    packs, targets = shard_reads(pack_dir, target, plan.alpha, index, plan.max_shard_bytes)
    for view, names in ((pview, packs), (tview, targets)):
        if view is not None and not names <= view.whole:
            missing = sorted(names - view.whole)[0]
            raise ArtifactCorruptError(
                f"{view.label}: {missing} changed in the object store while the split ran "
                "(its checked copy plans other reads than its header did); nothing was "
                "published — submit the merge again",
                file=missing,
            )
