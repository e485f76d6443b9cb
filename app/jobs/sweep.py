"""An alpha sweep: each alpha merged in the engine while it loads (no checkpoint per
alpha), evaluated, the objective's pick published like a one-alpha merge."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING

from app.core.errors import IncompatibleModelsError
from app.evals.choose import NoAlphaError, choose_alpha
from app.jobs.evaljobs import EvalItem, evaluate_items, reference_items
from app.jobs.models import JobRecord, JobResult, JobStage, JobStatus
from app.jobs.outcome import Outcome, publish

if TYPE_CHECKING:
    from pathlib import Path

    from app.engines.source import LocalModel, Opener
    from app.jobs.reporter import JobReporter
    from app.jobs.runner import JobRunner


class SweepRejectedError(NoAlphaError):
    """No alpha met the objective; the failed job still shows every score.

    Attributes:
        result: the job's result without a model: the residual key and the report
            (``evaluation``: every alpha's and reference's scores, why each was left out).
    """

    def __init__(self, exc: NoAlphaError, residual_key: str) -> None:
        super().__init__(exc.message, exc.report)
        self.result = JobResult(
            model_id="",
            merged_key="",
            residual_key=residual_key,
            output="",
            manifest={},
            evaluation=exc.report,
        )


def run_sweep(
    runner: JobRunner, rec: JobRecord, reporter: JobReporter, cancel: threading.Event
) -> Outcome:
    """The residual (computed or reused), the target and every alpha evaluated, the pick
    merged and published in the store; the result carries the sweep's report, and the
    outcome the pick's entry (registered, and served when asked, as the job ends).

    Raises:
        SweepRejectedError: no alpha met the objective (nothing is published); the job's
            result still carries the scores.
    """
    from app.jobs.inline import residual_of
    from app.residuals.sources import local_source
    from app.store.inputs import resolve_input

    s = runner.job_spec(rec)
    assert s.sweep is not None and s.eval is not None and s.target is not None
    key, manifest = residual_of(runner, s, reporter, cancel)
    if getattr(manifest, "vocab", None) is not None:
        raise IncompatibleModelsError(
            "an alpha sweep merges in the engine, which needs the target's shapes to stay "
            "the same, but the instruct model added vocabulary rows; give one alpha"
        )
    target = resolve_input(s.target, runner.store, runner.settings.trusted_code_sha256)
    digest = local_source(target.path, runner.store.hasher).digest
    items = [EvalItem("target", target.ref, digest, _plain(target.path))]
    for alpha in s.sweep.sweep:
        content = f"inline-{key}-{items[0].content_key}-{alpha!r}"
        opener = _inline(runner, key, target.path, alpha)
        items.append(EvalItem(f"alpha={alpha:g}", s.target, content, opener, alpha))
    refs = {"base": manifest.base, "instruct": manifest.instruct}
    items += reference_items(runner, refs, [c for c in s.eval.compare if c != "target"])
    # every model is asked in the chat format of a merge (the instruct model's)
    scored = evaluate_items(runner, rec, items, s.eval, reporter, cancel, chat_from=1)
    try:
        report = choose_alpha(scored, s.sweep)
    except NoAlphaError as exc:
        raise SweepRejectedError(exc, key) from None
    chosen = next(m for m in report.models if m.label == report.chosen)
    assert chosen.alpha is not None
    runner.records.add_event(
        reporter.rec, "log", f"sweep picked {report.chosen} ({report.objective})"
    )
    # The pick is merged as a one-alpha job would be; the record's alpha now holds it.
    picked = reporter.rec.model_copy(
        update={"spec": rec.spec.model_copy(update={"alpha": chosen.alpha})}
    )
    picked = reporter.rec = runner.move(
        picked, JobStatus.running, JobStage.publish, f"publishing {report.chosen}"
    )
    done = publish(runner, picked, reporter, cancel)
    entry = done.entry
    if entry is not None and not entry.merged_key:  # served as the very merge it scored
        entry = entry.model_copy(update={"content_key": chosen.content_key or ""})
    return Outcome(done.result.model_copy(update={"evaluation": report}), done.nbytes, entry)


def _plain(path: Path) -> Opener:
    from app.engines.source import LocalModel

    local = LocalModel(path)
    return lambda: contextlib.nullcontext(local)


def _inline(runner: JobRunner, key: str, target: Path, alpha: float) -> Opener:
    from app.engines.base import InlineMerge
    from app.engines.source import LocalModel

    @contextlib.contextmanager
    def opener() -> Iterator[LocalModel]:
        with runner.store.using(key, "residuals") as pack:
            yield LocalModel(target, InlineMerge(pack, target, alpha))

    return opener
