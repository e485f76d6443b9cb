"""Whether a merge job is split by output shard, and the split's plan.

A job is split when its merged model would have at least
``REALIGN_MERGE_PARALLEL_MIN_SHARDS`` output shards, is not stored yet, and comes
from a stored residual (computed first, in the merge task, when the pair is new).
Everything here reads headers only, except computing a missing residual.
"""

from __future__ import annotations

import contextlib
import threading
from typing import TYPE_CHECKING

from app.core.settings import Settings
from app.jobs.models import MergeSpec
from app.jobs.shard_records import SplitPlan
from app.residuals.apply import open_pack, plan_fused
from app.residuals.apply_shard import plan_apply_shards
from app.residuals.checkpoint import Checkpoint
from app.residuals.plan import plan_output
from app.residuals.refs import ResolvedModel
from app.residuals.sources import describe_source
from app.residuals.space import ensure_space, merged_bytes
from app.store.base import Store
from app.store.inputs import resolve_input
from app.store.keys import merged_key

if TYPE_CHECKING:
    from app.jobs.reporter import JobReporter


def _resolve(ref: str, settings: Settings, st: Store) -> ResolvedModel:
    # Through the store: object-store refs are fetched into its node cache, pinned.
    return resolve_input(ref, st, settings.trusted_code_sha256)


def _stored(residual: str | None) -> bool:
    return residual is not None and "/" not in residual


def count_shards(spec: MergeSpec, settings: Settings, st: Store, target: Checkpoint) -> int:
    """Output shards of the job's merged model, from headers (no residual needed)."""
    max_shard = int(settings.max_shard_gb * 1024**3)
    if spec.residual is not None:
        with st.using(spec.residual) as pack_dir:
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
    split off, a residual given as a directory, the model already stored, in-engine).

    Raises:
        RealignError subclasses: inputs that do not resolve or fit (the job fails).
    """
    minimum = settings.merge_parallel_min_shards
    if minimum <= 0 or spec.target is None or (spec.serve and spec.serve_mode == "in_engine"):
        return None
    if spec.residual is not None and not _stored(spec.residual):
        return None
    tgt = _resolve(spec.target, settings, st)
    with Checkpoint.open(tgt.path) as target:
        if count_shards(spec, settings, st, target) < minimum:
            return None
    res_key = spec.residual or _compute(spec, settings, st, reporter, cancel)
    max_shard = int(settings.max_shard_gb * 1024**3)
    with st.using(res_key) as pack_dir, Checkpoint.open(tgt.path) as target:
        manifest, shards = plan_apply_shards(pack_dir, target, spec.alpha, max_shard)
        t_src = describe_source(tgt, st.hasher)
        key = merged_key(manifest.key or res_key, t_src.digest, alpha=spec.alpha)
        if st.exists(key, "merged"):
            return None  # reused (and verified) by the one-task path
        _, pack = open_pack(pack_dir)
        with pack:  # room for the model, before any worker writes
            ensure_space([(st.root, merged_bytes(target, pack, pack_dir / "assets"))])
    return SplitPlan(
        residual_key=res_key,
        target=str(tgt.path),
        target_src=t_src,
        alpha=spec.alpha,
        merged_key=key,
        max_shard_bytes=max_shard,
        files=[s.file for s in shards],
        nbytes=[s.nbytes for s in shards],
        tensors=[len(s.tensors) for s in shards],
    )


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
