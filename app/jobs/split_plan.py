"""Whether a merge job is split by output shard, and the split's plan.

A job is split when its merged model would have at least
``REALIGN_MERGE_PARALLEL_MIN_SHARDS`` output shards, is not stored yet, comes from a
stored residual (computed first, in the merge task, when the pair is new), and every
worker can reach its target: with an object store, an ``s3://`` or ``hf:`` target (a
local path is read on one node: such a merge runs as one task). Everything here reads
headers only (of an object store's pack: ranged GETs), except computing a missing
residual; the target was resolved (and hashed) when the job's refs were pinned.
"""

from __future__ import annotations

import contextlib
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from app.core.settings import Settings
from app.jobs.models import MergeSpec
from app.jobs.shard_records import SplitPlan
from app.residuals.apply import open_pack, plan_apply, plan_fused
from app.residuals.apply_shard import plan_apply_shards
from app.residuals.checkpoint import Checkpoint
from app.residuals.manifest import LineageInfo
from app.residuals.plan import layout_digest, plan_output
from app.residuals.refs import ModelRef, ResolvedModel
from app.residuals.sources import describe_source
from app.residuals.space import ensure_space, merged_bytes
from app.store.base import Store
from app.store.inputs import resolve_input
from app.store.keys import merged_key
from app.store.objects import ObjectStore

if TYPE_CHECKING:
    from app.jobs.reporter import JobReporter


def _resolve(ref: str, settings: Settings, st: Store) -> ResolvedModel:
    # Through the store: object-store refs are fetched into its node cache, pinned.
    return resolve_input(ref, st, settings.trusted_code_sha256)


def _stored(residual: str | None) -> bool:
    return residual is not None and "/" not in residual


def count_shards(spec: MergeSpec, settings: Settings, st: Store, target: Checkpoint) -> int:
    """Output shards of the job's merged model, from headers (no residual needed)."""
    from app.jobs.shard_inputs import pack_headers

    max_shard = int(settings.max_shard_gb * 1024**3)
    if spec.residual is not None:
        with _scratch(st) as scratch, pack_headers(st, spec.residual, scratch) as (pack_dir, _):
            return len(plan_apply_shards(pack_dir, target, spec.alpha, max_shard)[1])
    assert spec.base is not None and spec.instruct is not None
    with contextlib.ExitStack() as stack:
        ins, bas = (
            stack.enter_context(Checkpoint.open(_resolve(r, settings, st).path))
            for r in (spec.instruct, spec.base)
        )
        jobs, _ = plan_fused(ins, bas, target, spec.alpha)
    return len(plan_output([j.spec for j in jobs], max_shard))


def plan_split(
    spec: MergeSpec,
    settings: Settings,
    st: Store,
    reporter: JobReporter,
    cancel: threading.Event,
) -> SplitPlan | None:
    """The split of the job's merge, or None when it runs as one task (small output,
    split off, a residual given as a directory, the model already stored, in-engine,
    a method other than task arithmetic or several residuals).

    Raises:
        RealignError subclasses: inputs that do not resolve or fit (the job fails).
    """
    minimum = settings.merge_parallel_min_shards
    if minimum <= 0 or spec.target is None or (spec.serve and spec.serve_mode == "in_engine"):
        return None
    if spec.method != "task_arithmetic" or spec.params or spec.residuals:
        return None  # apply-time methods and several residuals: one task, tensor by tensor
    if spec.residual is not None and not _stored(spec.residual):
        return None
    tgt = _resolve(spec.target, settings, st)
    with Checkpoint.open(tgt.path) as target:
        if count_shards(spec, settings, st, target) < minimum:
            return None
    if isinstance(st, ObjectStore) and ModelRef.parse(tgt.ref).kind == "local":
        note = f"not split: the target {tgt.ref} is a local path other nodes cannot read"
        reporter.runner.records.add_event(reporter.rec, "log", f"{note}; give s3:// or hf:")
        return None
    lineage = _check_target(spec, settings, st, tgt)  # before the residual is computed
    res_key = spec.residual or _compute(spec, settings, st, reporter, cancel)
    plan = _plan(spec, settings, st, tgt, res_key)
    return plan.model_copy(update={"lineage": lineage}) if plan is not None else None


def _check_target(
    spec: MergeSpec, settings: Settings, st: Store, tgt: ResolvedModel
) -> LineageInfo | None:
    """The instruct model and the target against the base, on this node, which holds
    them (the shard tasks and the final task read parts only); None when a stored
    residual was given.

    Raises:
        UnrelatedModelsError: the target does not descend from the base (no ``force``).
    """
    from app.pipeline.context import Ctx
    from app.pipeline.lineage import check_models

    if spec.base is None:
        return None
    assert spec.instruct is not None
    with (
        Checkpoint.open(_resolve(spec.base, settings, st).path) as base,
        Checkpoint.open(_resolve(spec.instruct, settings, st).path) as instruct,
        Checkpoint.open(tgt.path) as target,
    ):
        ctx = Ctx(settings, st)
        return check_models(ctx, base, instruct=instruct, target=target, force=spec.force)


def _plan(
    spec: MergeSpec, settings: Settings, st: Store, tgt: ResolvedModel, res_key: str
) -> SplitPlan | None:
    from app.jobs.shard_inputs import pack_headers

    max_shard = int(settings.max_shard_gb * 1024**3)
    with (
        _scratch(st) as scratch,
        pack_headers(st, res_key, scratch) as (pack_dir, _),
        Checkpoint.open(tgt.path) as target,
    ):
        manifest, shards = plan_apply_shards(pack_dir, target, spec.alpha, max_shard)
        t_src = describe_source(tgt, st.hasher)
        key = merged_key(manifest.key or res_key, t_src.digest, alpha=spec.alpha)
        if st.exists(key, "merged"):
            return None  # reused (and verified) by the one-task path
        _, pack = open_pack(pack_dir)
        with pack:
            jobs = plan_apply(manifest, pack, target, spec.alpha)
            if not isinstance(st, ObjectStore):  # room for the model, before any worker writes
                ensure_space([(st.root, merged_bytes(target, pack, pack_dir / "assets"))])
    return SplitPlan(
        residual_key=res_key,
        target=tgt.ref,
        target_src=t_src,
        alpha=spec.alpha,
        merged_key=key,
        max_shard_bytes=max_shard,
        layout=layout_digest([j.spec for j in jobs], max_shard),
        files=[s.file for s in shards],
        nbytes=[s.nbytes for s in shards],
        tensors=[len(s.tensors) for s in shards],
    )


@contextlib.contextmanager
def _scratch(st: Store) -> Iterator[Path]:
    """A directory of this node's store for headers fetched to plan with."""
    with tempfile.TemporaryDirectory(prefix=".plan-", dir=st.root) as tmp:
        yield Path(tmp)


def _compute(
    spec: MergeSpec,
    settings: Settings,
    st: Store,
    reporter: JobReporter,
    cancel: threading.Event,
) -> str:
    """The stored residual of the job's pair, computed now when it is new."""
    from app.merge import compute

    assert spec.base is not None and spec.instruct is not None
    res = compute(
        spec.base,
        spec.instruct,
        dtype=spec.dtype,
        method=spec.method,
        store=st,
        device=settings.device,
        progress=reporter,
        cancel=cancel,
        notice=lambda msg: reporter.runner.records.add_event(reporter.rec, "status", msg),
        verify_pack=False,  # the shard tasks read and verify it
        force=spec.force,
        settings=settings,
    )
    return res.key
