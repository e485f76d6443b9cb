"""A serve=true job in ``in_engine`` mode: only the residual is stored; the engine
computes target + alpha * R while it loads (no merged checkpoint is written)."""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

from app.core.errors import IncompatibleModelsError
from app.jobs.models import JobRecord, JobResult, MergeSpec
from app.jobs.outcome import Outcome
from app.jobs.records import ModelEntry
from app.jobs.reporter import JobReporter
from app.jobs.requests import check_in_engine
from app.residuals.manifest import ResidualManifest

if TYPE_CHECKING:
    from app.jobs.runner import JobRunner


def run_in_engine(
    runner: JobRunner, rec: JobRecord, reporter: JobReporter, cancel: threading.Event
) -> Outcome:
    """Compute (or verify the stored) residual and check it against the target; the
    outcome's entry (registered once evaluated, if the job asks) lets the engine merge
    the model while loading.

    Raises:
        IncompatibleModelsError: the instruct side added vocabulary rows (the target's
            shapes would change: only a merged checkpoint can serve that).
    """
    from app.merge import preflight
    from app.store.inputs import resolve_input

    s = runner.job_spec(rec)
    assert s.target is not None
    check_in_engine(s)
    store, settings = runner.store, runner.settings
    key, manifest = residual_of(runner, s, reporter, cancel)
    if getattr(manifest, "vocab", None) is not None:
        raise IncompatibleModelsError(
            "in_engine serving needs the target's shapes to stay the same, but "
            "the instruct model added vocabulary rows; use serve_mode "
            "'checkpoint'"
        )
    lineage = preflight(
        target=s.target, residual=key, alpha=s.alpha, force=s.force, store=store,
        settings=settings,
    )  # fmt: skip
    reporter.check()
    # serving resolves the target again on its own node: record the pinned ref
    target = resolve_input(s.target, store, settings.trusted_code_sha256)
    model_id = s.name or f"realign-{key[:8]}-inline"
    entry = ModelEntry(
        id=model_id,
        merged_key="",
        residual_key=key,
        alpha=s.alpha,
        base=manifest.base.ref,
        instruct=manifest.instruct.ref,
        target=target.ref,
        owner=rec.owner,
        job_id=rec.id,
        serve=True,
        serve_mode="in_engine",
    )
    result = JobResult(
        model_id=model_id,
        merged_key="",
        residual_key=key,
        output="",
        manifest={"residual": key, "target": s.target, "alpha": s.alpha},
        lineage=lineage,
    )
    return Outcome(result, 0, entry)


def residual_of(
    runner: JobRunner, s: MergeSpec, reporter: JobReporter, cancel: threading.Event
) -> tuple[str, ResidualManifest]:
    """The residual's key and manifest: computed (or reused), or the stored one given,
    verified in full (the engine reads the pack itself)."""
    from app.merge import compute
    from app.store.recovery import verify_pack

    def notice(msg: str) -> object:  # a rebuilt corrupt artifact is told in the events
        return runner.records.add_event(reporter.rec, "status", msg)

    store = runner.store
    if s.residual is not None:
        key = store.resolve(s.residual)  # a key prefix names one pack
        return key, verify_pack(store, key, notice)
    assert s.base is not None and s.instruct is not None
    res = compute(
        s.base,
        s.instruct,
        dtype=s.dtype,
        store=store,
        settings=runner.settings,
        device=runner.settings.device,
        progress=reporter,
        cancel=cancel,
        notice=notice,
        force=s.force,
    )
    return res.key, res.manifest
