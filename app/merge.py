"""The Python API of the residual engine — the verbs of the ``realign`` CLI.

Everything above the pure core (job service, CLI, demo) calls these functions;
none of them re-implements merge logic. Each takes the caller's ``Settings`` (the
process's, read once, when none is given) and a store: a ``Store`` from
:func:`app.store.factory.store_from_settings`, a local store directory, or None for
the configured one (opened without a build lock shared across machines: cluster
callers pass ``app.jobs.locks.cluster_store(settings)``). The work is done in
``app.pipeline``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from app.core.errors import InvalidParameterError
from app.core.settings import Settings, get_settings
from app.pipeline import catalog, merged, multi, request, stored
from app.pipeline import convert as conversion
from app.pipeline import fidelity as fidelities
from app.pipeline import residual as residuals
from app.pipeline.context import DTYPES, Ctx, StoreArg
from app.pipeline.convert import ConvertResult
from app.pipeline.fidelity import FidelityReport
from app.pipeline.request import ResidualInput, Run
from app.pipeline.residual import ComputeResult, MergeResult
from app.pipeline.stored import StoredMerge
from app.residuals.devices import check_device
from app.residuals.manifest import LineageInfo, MergeManifest, ResidualManifest
from app.residuals.progress import CancelFlag, ProgressCallback
from app.store.base import ArtifactInfo, Store
from app.store.recovery import Notice

if TYPE_CHECKING:
    from app.evals.stored import StoredScore

__all__ = [
    "DTYPES",
    "ComputeResult",
    "ConvertResult",
    "MergeResult",
    "ResidualInput",
    "StoredMerge",
    "apply",
    "compute",
    "convert",
    "evaluations",
    "fidelity",
    "inspect",
    "list_artifacts",
    "merge",
    "merge_to_store",
    "open_store",
    "preflight",
    "remove",
    "resolve_model",
    "verify",
]


def _ctx(store: StoreArg, settings: Settings | None) -> Ctx:
    s = settings if settings is not None else get_settings()  # the entry point reads it once
    return Ctx(s, store)


def open_store(store: StoreArg = None, settings: Settings | None = None) -> Store:
    """The store at ``store``, or the one ``settings`` configure."""
    return _ctx(store, settings).store


def resolve_model(ref: str, store: StoreArg = None, settings: Settings | None = None) -> Path:
    """The local directory of a model reference (Hub and s3 refs downloaded, pinned)."""
    return _ctx(store, settings).resolve(ref).path


def compute(
    base: str,
    instruct: str,
    *,
    dtype: str | None = None,
    method: str = "task_arithmetic",
    store: StoreArg = None,
    device: str = "cpu",
    progress: ProgressCallback | None = None,
    cancel: CancelFlag | None = None,
    max_shard_gb: float | None = None,
    notice: Notice | None = None,
    verify_pack: bool = True,
    force: bool = False,
    settings: Settings | None = None,
) -> ComputeResult:
    """Compute (or reuse) the residual pack of ``instruct - base`` in the store.

    A stored pack is verified before its key is handed on (``verify_pack=False``: only
    its manifest, for callers that read the pack next, which verifies it); a corrupt one
    is quarantined and rebuilt (``notice`` hears of it). ``force`` computes it even when
    the lineage check finds the instruct model unrelated to the base.

    Raises:
        UnrelatedModelsError: the instruct model does not descend from the base.
        RealignError subclasses for bad refs, incompatible models, cancellation.
    """
    check_device(device)  # before any input or the store is opened
    ctx = _ctx(store, settings)
    return residuals.compute(
        ctx, base, instruct, dtype=dtype or ctx.settings.residual_dtype, method=method,
        device=device,
        progress=progress, cancel=cancel, max_shard_gb=max_shard_gb, notice=notice,
        verify_pack=verify_pack, force=force,
    )  # fmt: skip


def convert(
    key: str,
    dtype: str,
    *,
    remove_old: bool = False,
    store: StoreArg = None,
    device: str = "cpu",
    progress: ProgressCallback | None = None,
    cancel: CancelFlag | None = None,
    notice: Notice | None = None,
    settings: Settings | None = None,
) -> ConvertResult:
    """The pack of stored residual ``key`` (key or prefix) in format ``dtype`` (``exact``,
    ``bfloat16``, ``float16``, ``float32``): computed by :func:`compute` from the sources
    its manifest records, once their digests are checked, and kept only under the content
    key those digests give. The same format returns ``key`` itself. ``remove_old``
    removes the old pack afterwards (kept, and ``notice`` told, while a job reads it).

    Raises:
        SourcesUnavailableError: a source is gone or changed; the message names it and the
            ``realign compute`` that makes the pack from the models where they are now.
        ArtifactNotFoundError, InvalidParameterError (an unknown format).
    """
    check_device(device)  # before any input or the store is opened
    ctx = _ctx(store, settings)
    return conversion.convert(
        ctx, key, dtype, device=device, progress=progress, cancel=cancel, notice=notice,
        remove_old=remove_old,
    )  # fmt: skip


def apply(
    residual: str | Sequence[ResidualInput],
    target: str,
    out: Path,
    *,
    alpha: float = 1.0,
    store: StoreArg = None,
    device: str = "cpu",
    progress: ProgressCallback | None = None,
    cancel: CancelFlag | None = None,
    overwrite: bool = False,
    max_shard_gb: float | None = None,
    hash_outputs: bool = False,
    notice: Notice | None = None,
    method: str = "task_arithmetic",
    params: dict[str, object] | None = None,
    dtype: str | None = None,
    force: bool = False,
    settings: Settings | None = None,
) -> MergeResult:
    """Apply a stored residual (key, key prefix or pack directory) to ``target``,
    writing a model directory at ``out`` atomically.

    ``residual`` may also be several residuals with weights (a pair's pack computed in
    ``dtype`` first), merged by ``method`` with ``params`` in one pass over the target.
    The pack is verified as it is read; a stored pack found corrupt is quarantined
    and rebuilt from its sources (``notice`` is told), else the error says what to do.
    Nothing is written to ``out`` from a corrupt pack. The target is checked against
    the residual's base when that is at hand (``force``: merged even when unrelated)."""
    check_device(device)  # before any input or the store is opened
    ctx = _ctx(store, settings)
    inputs = [ResidualInput(key=residual)] if isinstance(residual, str) else list(residual)
    if not request.is_classic(method, params, inputs) or inputs[0].key is None:
        return multi.merge_to_dir(
            ctx, target=target, inputs=inputs, out=out, alpha=alpha, method=method,
            params=params, dtype=dtype or ctx.settings.residual_dtype,
            run=Run(device, progress, cancel, notice, force),
            overwrite=overwrite, max_shard_gb=max_shard_gb, hash_outputs=hash_outputs,
        )  # fmt: skip
    return residuals.apply(
        ctx, inputs[0].key, target, out, alpha=alpha, device=device,
        progress=progress, cancel=cancel, overwrite=overwrite, max_shard_gb=max_shard_gb,
        hash_outputs=hash_outputs, notice=notice, force=force,
    )  # fmt: skip


def merge(
    base: str,
    instruct: str,
    target: str,
    out: Path,
    *,
    alpha: float = 1.0,
    dtype: str | None = None,
    store: StoreArg = None,
    device: str = "cpu",
    no_cache: bool = False,
    progress: ProgressCallback | None = None,
    cancel: CancelFlag | None = None,
    overwrite: bool = False,
    max_shard_gb: float | None = None,
    hash_outputs: bool = False,
    method: str = "task_arithmetic",
    notice: Notice | None = None,
    params: dict[str, object] | None = None,
    force: bool = False,
    settings: Settings | None = None,
) -> MergeResult:
    """``target + alpha * (instruct - base)`` into ``out``.

    With ``no_cache`` it runs one fused pass and stores nothing. Otherwise a stored
    residual is applied; when there is none yet, one pass over the three inputs
    writes the residual into the store and the merged model together. Another
    ``method`` (``ties``, ``dare``, with ``params``) transforms the stored residual as
    it is applied (``no_cache`` is refused: those methods need a stored pack).

    Raises:
        UnrelatedModelsError: the instruct model or the target does not descend from the
            base (the lineage check; ``force`` merges anyway and records the figures).
    """
    check_device(device)  # before any input or the store is opened
    ctx = _ctx(store, settings)
    dtype = dtype or ctx.settings.residual_dtype
    pair = [ResidualInput(base=base, instruct=instruct)]
    if not request.is_classic(method, params, pair):
        request.check_request(method, params, pair)
        if no_cache:
            raise InvalidParameterError(
                f"--no-cache runs the fused one-pass task-arithmetic merge; {method} "
                "transforms a stored residual pack as it applies it: drop --no-cache"
            )
        return multi.merge_to_dir(
            ctx, target=target, inputs=pair, out=out, alpha=alpha, method=method,
            params=params, dtype=dtype, run=Run(device, progress, cancel, notice, force),
            overwrite=overwrite, max_shard_gb=max_shard_gb, hash_outputs=hash_outputs,
        )  # fmt: skip
    return merged.merge(
        ctx, base, instruct, target, out, alpha=alpha, dtype=dtype,
        device=device, no_cache=no_cache, progress=progress, cancel=cancel,
        overwrite=overwrite, max_shard_gb=max_shard_gb, hash_outputs=hash_outputs,
        method=method, notice=notice, force=force,
    )  # fmt: skip


def inspect(
    ref: str, store: StoreArg = None, settings: Settings | None = None
) -> ResidualManifest | MergeManifest:
    """The manifest of a residual (key or pack dir) or of a merged model directory."""
    return catalog.inspect(ref, _ctx(store, settings).store)


def evaluations(
    ref: str, store: StoreArg = None, settings: Settings | None = None
) -> list[StoredScore]:
    """The evaluation scores stored for a merged model (key, prefix or store directory)."""
    return catalog.evaluations(ref, _ctx(store, settings).store)


def fidelity(
    residual: str,
    target: str,
    *,
    alpha: float = 1.0,
    prompts: Sequence[str] | None = None,
    max_new_tokens: int = 32,
    work: Path | None = None,
    store: StoreArg = None,
    settings: Settings | None = None,
) -> FidelityReport:
    """How closely ``target + alpha * R`` merged from a pack (a lossy one, typically)
    follows the merge from the exact R: greedy-token agreement and mean KL of the
    next-token distributions over a fixed prompt set (transformers, CPU; see
    :mod:`app.pipeline.fidelity`). The pack's instruct and base models must be at hand.
    """
    return fidelities.fidelity(
        _ctx(store, settings), residual, target, alpha=alpha,
        prompts=prompts or fidelities.DEFAULT_PROMPTS, max_new_tokens=max_new_tokens, work=work,
    )  # fmt: skip


def verify(key: str, store: StoreArg = None, settings: Settings | None = None) -> ResidualManifest:
    """Check every file of a stored residual against its recorded checksum; a corrupt
    one is quarantined (moved aside, kept) and the error says how to compute it again.

    Raises:
        ArtifactCorruptError: a file is missing or does not match.
    """
    return catalog.verify(key, _ctx(store, settings).store)


def list_artifacts(store: StoreArg = None, settings: Settings | None = None) -> list[ArtifactInfo]:
    """Everything in the store, oldest use first."""
    return catalog.list_artifacts(_ctx(store, settings).store)


def remove(key: str, store: StoreArg = None, settings: Settings | None = None) -> str:
    """Delete a stored residual (refused while in use) and the merged models made from
    it (a residual removed because it was bad leaves nothing made from it to reuse);
    returns the full key."""
    return catalog.remove(key, _ctx(store, settings).store)


def preflight(
    *,
    target: str,
    base: str | None = None,
    instruct: str | None = None,
    residual: str | None = None,
    alpha: float = 1.0,
    force: bool = False,
    store: StoreArg = None,
    method: str = "task_arithmetic",
    params: dict[str, object] | None = None,
    residuals: Sequence[ResidualInput] | None = None,
    settings: Settings | None = None,
) -> LineageInfo | None:
    """Every check of a merge request made before the merge: refs resolve, families
    match, names and shapes line up (configs, tokenizers, safetensors headers); the
    method and its parameters, the residuals and their weights; and the lineage check,
    from a few sampled rows of a few tensors (milliseconds): for several residuals, of
    the target against each residual's base. A Hub model's weights are not downloaded
    for it (its safetensors headers are read by ranges; its lineage is measured once
    the merge has downloaded it).

    Returns:
        The lineage figures (None: the one stored residual of a task-arithmetic merge
        was found corrupt; the job rebuilds it and checks then).

    Raises:
        UnrelatedModelsError: a model does not descend from the base and ``force`` is unset.
        RealignError subclasses describing the first problem found.
    """
    ctx = _ctx(store, settings)
    inputs = request.inputs_of(residual, base, instruct, residuals)
    if not request.is_classic(method, params, inputs):
        return multi.preflight(
            ctx, target=target, inputs=inputs, alpha=alpha, method=method, params=params,
            force=force,
        )  # fmt: skip
    return stored.preflight(
        ctx, target=target, base=base, instruct=instruct, residual=residual, alpha=alpha,
        force=force,
    )  # fmt: skip


def merge_to_store(
    *,
    target: str,
    base: str | None = None,
    instruct: str | None = None,
    residual: str | None = None,
    alpha: float = 1.0,
    dtype: str | None = None,
    method: str = "task_arithmetic",
    store: StoreArg = None,
    device: str = "cpu",
    progress: ProgressCallback | None = None,
    cancel: CancelFlag | None = None,
    notice: Notice | None = None,
    params: dict[str, object] | None = None,
    residuals: Sequence[ResidualInput] | None = None,
    force: bool = False,
    settings: Settings | None = None,
) -> StoredMerge:
    """Compute or reuse the residual, then publish ``target + alpha * R`` as a
    content-addressed merged model in the store (``merged/<key>``); idempotent.

    ``method`` is the merge method of a residual computed here (a stored ``residual``
    is applied with its own). Every stored input is verified: a pack as it is read,
    a merged model that is reused by hashing its shards before it is handed out. A
    corrupt one is quarantined and rebuilt from its sources, and ``notice`` hears of it.

    Another ``method`` (``ties``, ``dare``) with ``params``, or several ``residuals``
    (instead of ``residual`` or ``base`` + ``instruct``), run in one pass over the
    target; the merged model's key holds the method, its parameters and the weights.

    Raises:
        ArtifactCorruptError: a corrupt pack whose sources are not available.
        InvalidParameterError: an unknown method, bad parameters or weights.
    """
    check_device(device)  # before any input or the store is opened
    ctx = _ctx(store, settings)
    dtype = dtype or ctx.settings.residual_dtype
    inputs = request.inputs_of(residual, base, instruct, residuals)
    if not request.is_classic(method, params, inputs):
        return multi.merge_to_store(
            ctx, target=target, inputs=inputs, alpha=alpha, method=method, params=params,
            dtype=dtype, run=Run(device, progress, cancel, notice, force),
        )  # fmt: skip
    return stored.merge_to_store(
        ctx, target=target, base=base, instruct=instruct,
        residual=residual, alpha=alpha, dtype=dtype, method=method, device=device,
        progress=progress, cancel=cancel, notice=notice, force=force,
    )  # fmt: skip
