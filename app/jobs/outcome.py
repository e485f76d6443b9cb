"""What a merge job makes, and how it ends: the residual or merged model published in
the store, evaluated when the job asks, and only then registered for serving.

The order matters: the merged checkpoint is a content-addressed artifact that later
merges reuse, so it is published first; its catalog entry is built then but registered
only once the job's evaluation (if any) passed, so an evaluation that fails or is
cancelled ends the job with no model in ``GET /v1/models`` and nothing announced.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from app.core.errors import InvalidParameterError
from app.jobs.models import JobRecord, JobResult, JobStage, JobStatus
from app.jobs.records import ModelEntry
from app.jobs.reporter import JobReporter
from app.jobs.requests import residual_inputs

if TYPE_CHECKING:
    from app.jobs.runner import JobRunner
    from app.merge import StoredMerge


@dataclass(frozen=True)
class Outcome:
    """What a job's run produced: its result and size, and the model it registers once
    its evaluation passed (None: nothing to register)."""

    result: JobResult
    nbytes: int
    entry: ModelEntry | None = None


def conclude(
    runner: JobRunner, rec: JobRecord, outcome: Outcome, reporter: JobReporter | None = None
) -> None:
    """End a job whose model is published: evaluated first when the job asks, then
    registered, then succeeded or handed to serving.

    Raises:
        OperationCancelledError: cancelled (or the lease lost) while evaluating; nothing
            was registered.
        RealignError: the evaluation failed; nothing was registered.
    """
    result, entry = outcome.result, outcome.entry
    if rec.spec.eval is not None and result.evaluation is None:
        from app.jobs.evaljobs import evaluate_merge

        if entry is None:
            raise InvalidParameterError(
                f"job {rec.id} asks for an evaluation but made no model (it has no target); "
                "evaluate a merge's model, or a directory with POST /v1/evals"
            )

        reporter = reporter or JobReporter(runner, rec, threading.Event())
        reporter.rec = rec
        try:
            result = evaluate_merge(runner, rec, entry, result, reporter, reporter.cancel)
            reporter.check()  # a cancel during the last suite: nothing is registered
        except Exception as exc:
            # The merge stays published in the store (correct, and reused by the next
            # job): the failed job still says where, with no model id (none registered).
            if getattr(exc, "result", None) is None:
                exc.result = result.model_copy(update={"model_id": ""})  # type: ignore[attr-defined]
            raise
        rec = runner.records.get(rec.id) or reporter.rec
        # where its scores are stored (an in-engine merge's content key is computed)
        merge = result.evaluation.models[0] if result.evaluation else None
        if merge is not None and merge.content_key and merge.content_key != entry.merged_key:
            entry = entry.model_copy(update={"content_key": merge.content_key})
    if entry is not None:
        runner.records.register_model(entry)
    rec = rec.model_copy(update={"result": result})
    if rec.spec.serve:
        # Serving replicas load it and report; the load watcher then ends the job.
        rec = runner.move(rec, JobStatus.running, JobStage.load, "waiting for an engine")
        runner.records.record_finish(rec, outcome.nbytes)
        runner.loads.announce(rec.id, result.model_id)
        return
    runner.finish(rec, JobStatus.succeeded, result=result, nbytes=outcome.nbytes)


def stored_outcome(runner: JobRunner, rec: JobRecord, done: StoredMerge) -> Outcome:
    """The outcome of a merge published in the store as ``done``: its result, size and
    catalog entry (registered by :func:`conclude`)."""
    s = runner.job_spec(rec)
    model_id = s.name or f"realign-{done.key[:12]}"
    m = done.manifest
    entry = ModelEntry(
        id=model_id,
        merged_key=done.key,
        residual_key=done.residual_key,
        alpha=s.alpha,
        base=m.base.ref,
        instruct=m.instruct.ref,
        target=m.target.ref,
        owner=rec.owner,
        job_id=rec.id,
        serve=s.serve,
        serve_mode=s.serve_mode,
    )
    result = JobResult(
        model_id=model_id,
        merged_key=done.key,
        residual_key=done.residual_key,
        output=str(done.path),
        manifest=m.model_dump(mode="json"),
        lineage=m.lineage,
    )
    return Outcome(result, sum(f.size for f in m.files.values()), entry)


def publish(
    runner: JobRunner, rec: JobRecord, reporter: JobReporter, cancel: threading.Event
) -> Outcome:
    """Merge ``rec``'s spec on this worker into the store (a checkpoint, or for
    in-engine serving the residual checked against the target)."""
    if rec.spec.serve and rec.spec.serve_mode == "in_engine":
        from app.jobs.inline import run_in_engine

        return run_in_engine(runner, rec, reporter, cancel)
    return checkpoint(runner, rec, reporter, cancel)


def checkpoint(
    runner: JobRunner, rec: JobRecord, reporter: JobReporter, cancel: threading.Event
) -> Outcome:
    """Residual (computed or reused), apply, publish the merged checkpoint."""
    from app.merge import merge_to_store

    s = runner.job_spec(rec)
    assert s.target is not None
    done = merge_to_store(
        target=s.target,
        base=s.base,
        instruct=s.instruct,
        residual=s.residual,
        alpha=s.alpha,
        dtype=s.dtype,
        method=s.method,
        store=runner.store,
        settings=runner.settings,
        device=runner.settings.device,
        progress=reporter,
        cancel=cancel,
        notice=_notice(runner, reporter),
        params=dict(s.params),
        residuals=residual_inputs(s),
        force=s.force,
    )
    reporter.check()  # nothing goes on for a job this worker no longer owns
    rec = runner.move(reporter.rec, JobStatus.running, JobStage.publish)
    return stored_outcome(runner, rec, done)


def residual_only(
    runner: JobRunner, rec: JobRecord, reporter: JobReporter, cancel: threading.Event
) -> Outcome:
    """A job without a target: the residual pack, computed or reused."""
    from app.merge import compute

    s = runner.job_spec(rec)
    assert s.base is not None and s.instruct is not None
    res = compute(
        s.base,
        s.instruct,
        dtype=s.dtype,
        method=s.method,
        store=runner.store,
        settings=runner.settings,
        device=runner.settings.device,
        progress=reporter,
        cancel=cancel,
        notice=_notice(runner, reporter),
        force=s.force,
    )
    result = JobResult(
        model_id="",
        merged_key="",
        residual_key=res.key,
        output=str(res.path),
        manifest=res.manifest.model_dump(mode="json"),
        lineage=res.lineage,
    )
    return Outcome(result, res.manifest.total_bytes)


def _notice(runner: JobRunner, reporter: JobReporter) -> Callable[[str], object]:
    """Where a rebuilt corrupt artifact is told: the job's events."""
    return lambda msg: runner.records.add_event(reporter.rec, "status", msg)
