"""The first merge of a new (instruct, base) pair in one pass: read instruct, base and
the target once, write the residual pack and the merged model together.

Each chunk's residual is computed, cast to the pack's dtype, then applied to the
target's rows from those very bytes, so the merged model has the same bits as
``apply_residual`` of the stored pack would give — without reading the inputs twice
or the freshly written residual back from disk. A lossy pack (int8, int4, bitdelta) is
written first and then applied, so the merge reads the values the pack holds.
"""

from __future__ import annotations

from pathlib import Path

from app.residuals.apply import (
    applied_manifest,
    apply_residual,
    copy_job,
    finish_merged,
    match_target,
    merged_order,
    merged_writer,
)
from app.residuals.checkpoint import Checkpoint
from app.residuals.compat import family_of
from app.residuals.compute import (
    compute_residual,
    finish_residual,
    plan_residual,
    residual_writer,
)
from app.residuals.dtypes import DType, is_lossy
from app.residuals.headers import TensorInfo
from app.residuals.manifest import (
    LineageInfo,
    MergeManifest,
    ResidualManifest,
    SourceInfo,
    written_entries,
)
from app.residuals.shards import TensorSpec
from app.residuals.sources import RunOptions, make_runner
from app.residuals.tensorjobs import FollowUp, Source, TensorJob


def compute_and_apply(
    instruct: Checkpoint,
    base: Checkpoint,
    target: Checkpoint,
    residual_dir: Path,
    out_dir: Path,
    *,
    sources: tuple[SourceInfo, SourceInfo, SourceInfo],
    dtype: DType,
    alpha: float = 1.0,
    method: str = "task_arithmetic",
    key: str | None = None,
    opts: RunOptions | None = None,
    lineage: LineageInfo | None = None,
) -> tuple[ResidualManifest, MergeManifest]:
    """Write the residual pack of (instruct, base) into ``residual_dir`` and ``target +
    alpha * R`` into ``out_dir`` (both empty staging directories), in one pass.

    Args:
        sources: identities of (instruct, base, target).
        dtype: storage dtype of R; the merged model keeps the target's dtypes.
        lineage: figures of the lineage check, for the merged model's manifest.

    Returns:
        The residual's manifest and the merged model's.

    Raises:
        IncompatibleModelsError: the triple fails preflight.
        OperationCancelledError: cancelled; the caller discards both directories.
    """
    opts = opts or RunOptions()
    if is_lossy(dtype):  # the merge reads the values the pack holds
        residual = compute_residual(
            instruct, base, residual_dir, instruct_src=sources[0], base_src=sources[1],
            dtype=dtype, method=method, key=key, opts=opts,
        )  # fmt: skip
        merged = apply_residual(
            residual_dir, target, out_dir, target_src=sources[2], alpha=alpha, opts=opts,
            lineage=lineage,
        )  # fmt: skip
        return residual, merged
    jobs, pairing = plan_residual(instruct, base, dtype)
    expected = {
        j.spec.name: (j.common_rows, *j.spec.shape[1:]) if j.spec.shape else () for j in jobs
    }
    tensors = match_target(family_of(instruct.config), expected, set(pairing.copied), target)
    jobs = [_then_apply(j, target, tensors[j.spec.name], alpha) for j in jobs]
    order = merged_order([j.spec.name for j in jobs], set(pairing.copied), tensors)
    copies = [copy_job(target, tensors[n]) for n in order if n in pairing.copied]
    merged_specs = [j.then.spec for j in jobs if j.then] + [c.spec for c in copies]
    with (
        residual_writer(residual_dir, jobs, opts, dtype) as res_writer,
        merged_writer(out_dir, merged_specs, opts) as out_writer,
    ):
        stats = make_runner(method, "residual+apply", opts).run(jobs, res_writer, out_writer)
        make_runner(method, "apply", opts).run(copies, out_writer)
    residual = finish_residual(
        residual_dir, res_writer, jobs, stats, pairing, instruct,
        sources=(sources[0], sources[1]), dtype=dtype, method=method, key=key,
    )  # fmt: skip
    merged = applied_manifest(residual, sources[2], alpha, written_entries(out_writer), lineage)
    merged = finish_merged(
        out_dir, merged, target, residual_dir / "assets", dict(residual.special_tokens)
    )
    return residual, merged


def _then_apply(job: TensorJob, target: Checkpoint, tensor: TensorInfo, alpha: float) -> TensorJob:
    """``job`` (a residual tensor) followed by its apply to the target's ``tensor``."""
    return TensorJob(
        job.spec,
        job.kind,
        job.inputs,
        job.common_rows,
        exact=job.exact,
        then=FollowUp(
            TensorSpec(job.spec.name, tensor.dtype, job.spec.shape), Source(target, tensor), alpha
        ),
    )
