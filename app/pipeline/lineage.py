"""Which models the verbs' lineage check compares, under the settings' limit (see
:mod:`app.residuals.lineage` for the measure and its calibration)."""

from __future__ import annotations

import contextlib
from pathlib import Path

from app.core.errors import RealignError
from app.pipeline.context import Ctx
from app.residuals.checkpoint import Checkpoint
from app.residuals.lineage import check_lineage, unmeasured
from app.residuals.manifest import LineageInfo, ResidualManifest, SourceInfo


def check_models(
    ctx: Ctx,
    base: Checkpoint,
    *,
    force: bool,
    instruct: Checkpoint | None = None,
    target: Checkpoint | None = None,
) -> LineageInfo:
    """The instruct model and/or target against ``base``.

    Raises:
        UnrelatedModelsError: one is not of the base's lineage and ``force`` is unset.
    """
    models = {r: c for r, c in (("instruct", instruct), ("target", target)) if c is not None}
    limit = ctx.settings.lineage_max_distance
    missing = [c.path for c in (base, *models.values()) if not _readable(c)]
    if missing:  # headers only (a Hub model before its download): measured later
        why = (
            f"the weights of {missing[0]} are not downloaded yet, so the lineage is "
            "checked when the merge step has them"
        )
        return unmeasured(why, max_distance=limit, force=force)
    return check_lineage(base, models, max_distance=limit, force=force)


def check_pack_target(
    ctx: Ctx,
    manifest: ResidualManifest,
    target: Checkpoint,
    *,
    force: bool,
    base: Path | None = None,
    instruct: Path | None = None,
) -> LineageInfo:
    """The target of a stored residual against the base the residual was computed from:
    ``base`` when the caller has it, else the directory the pack's manifest names, when
    it is still there. Without a base nothing can be measured: the record says so and
    nothing is refused.

    Raises:
        UnrelatedModelsError: as :func:`check_models`.
    """
    limit = ctx.settings.lineage_max_distance
    base_dir = base or _local(manifest.base)
    if base_dir is None:
        why = (
            f"target-base: the residual's base {manifest.base.ref} is not at "
            f"{manifest.base.path} on this machine, so the target's lineage was not checked"
        )
        return unmeasured(why, max_distance=limit, force=force)
    instruct_dir = instruct or _local(manifest.instruct)
    with contextlib.ExitStack() as stack:
        try:
            b_ckpt = stack.enter_context(Checkpoint.open(base_dir))
            i_ckpt = stack.enter_context(Checkpoint.open(instruct_dir)) if instruct_dir else None
        except (RealignError, OSError) as exc:
            why = f"target-base: the residual's base at {base_dir} could not be read ({exc})"
            return unmeasured(why, max_distance=limit, force=force)
        return check_models(ctx, b_ckpt, force=force, instruct=i_ckpt, target=target)


def _local(src: SourceInfo) -> Path | None:
    """The source's directory when it is still there with the file sizes its identity
    recorded (a cheap sign that it was not replaced; the figures are a sample anyway)."""
    path = Path(src.path)
    if not src.files or not path.is_dir():
        return None
    for name, entry in src.files.items():
        found = path / name
        if not found.is_file() or found.stat().st_size != entry.size:
            return None
    return path


def _readable(ckpt: Checkpoint) -> bool:
    """Whether the checkpoint's tensor data is here (not a headers-only view)."""
    return all(f.is_file() for f in {t.file for t in ckpt.tensors.values()})
