"""The worker's side of evaluations: what to evaluate (a served model, a directory, a
merge's inputs), each model's scores kept in the store by content key
(:mod:`app.evals.stored`), the report kept with the job.

An eval job runs as a merge does (the same lease, deliveries, cancel and events); a merge
that asks for an evaluation runs it once its model is published in the store, before
the model is registered for serving.
"""

from __future__ import annotations

import contextlib
import hashlib
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from app.core.errors import ModelNotFoundError, OperationCancelledError
from app.evals.models import EvalReport, EvalRequest, ModelEval, SuiteName, SuiteScore
from app.evals.stored import StoredScore, publish_score, read_score, score_key
from app.jobs.models import JobRecord, JobResult, JobStage, JobStatus
from app.jobs.outcome import Outcome
from app.residuals.assets import ASSET_NAMES
from app.residuals.manifest import SourceInfo, read_merge_manifest

if TYPE_CHECKING:
    from app.engines.source import LocalModel, Opener
    from app.evals.models import EvalTarget
    from app.handoff.entry import ModelEntry
    from app.jobs.reporter import JobReporter
    from app.jobs.runner import JobRunner


@dataclass(frozen=True)
class EvalItem:
    """One model to evaluate: a label, how to open its weights, its content key."""

    label: str
    model: str
    content_key: str
    open: Opener
    alpha: float | None = None


def run_eval_job(
    runner: JobRunner, rec: JobRecord, reporter: JobReporter, cancel: threading.Event
) -> Outcome:
    """An eval job's run: every model evaluated (or its cached scores reused); the result
    carries the report."""
    job = rec.evaluation
    assert job is not None
    entry = next((m for m in runner.records.models() if m.id == job.model), None)
    items = _served_items(runner, entry, job.request) if entry else [_dir_item(runner, job.model)]
    report = evaluate_items(runner, rec, items, job.request, reporter, cancel)
    head = items[0]
    result = JobResult(
        model_id=entry.id if entry else "",
        merged_key=entry.merged_key if entry else "",
        residual_key=entry.residual_key if entry else "",
        output=head.model,
        manifest={},
        evaluation=report,
    )
    return Outcome(result, 0)


def evaluate_merge(
    runner: JobRunner,
    rec: JobRecord,
    entry: ModelEntry,
    result: JobResult,
    reporter: JobReporter,
    cancel: threading.Event,
) -> JobResult:
    """A merge's own evaluation, once its model is published in the store and before
    ``entry`` (built, not registered yet) is: the merged model and the inputs named in
    ``compare``."""
    request = rec.spec.eval
    assert request is not None
    items = _served_items(runner, entry, request)
    report = evaluate_items(runner, rec, items, request, reporter, cancel)
    return result.model_copy(update={"evaluation": report})


def evaluate_items(
    runner: JobRunner,
    rec: JobRecord,
    items: list[EvalItem],
    request: EvalRequest,
    reporter: JobReporter,
    cancel: threading.Event,
    chat_from: int = 0,
) -> EvalReport:
    """Each item on each suite of ``request``, every one asked in the chat format of
    item ``chat_from`` (the merge's, which is the instruct model's): cached scores where
    the same weights were evaluated on the same suite inputs in that format, else
    evaluated now, all on one engine (swapped in place between models of one shape)."""
    rec = runner.move(reporter.rec, JobStatus.running, JobStage.evaluate, "evaluating")
    reporter.rec = rec
    with contextlib.ExitStack() as stack:
        opened = [stack.enter_context(item.open()) for item in items]
        chat_dir = opened[chat_from].assets
        chat = _dir_digest(chat_dir, _CHAT_FILES)
        inputs = {s: _inputs(s, request, chat) for s in request.suites}
        keys = [{s: score_key(i.content_key, s.value, inputs[s]) for s in request.suites}
                for i in items]  # fmt: skip
        scores = [_stored(runner, rec, k) for k in keys]
        for item, have in zip(items, scores, strict=True):
            todo = tuple(s for s in request.suites if s.value not in have)
            runner.records.add_event(rec, "log", _plan_line(item, have, todo))
        # Models missing the same suites are evaluated together, on those suites only.
        groups: dict[tuple[SuiteName, ...], list[int]] = {}
        for n, have in enumerate(scores):
            if todo := tuple(s for s in request.suites if s.value not in have):
                groups.setdefault(todo, []).append(n)
        for todo, members in groups.items():
            reporter.check()
            targets = [_target(opened[n], chat_dir) for n in members]
            asked = request.model_copy(update={"suites": todo})
            fresh = _evaluate(runner, rec, targets, asked, cancel)
            for n, got in zip(members, fresh, strict=True):
                for name, score in got.items():
                    suite = SuiteName(name)
                    publish_score(runner.store, StoredScore(
                        key=keys[n][suite], content_key=items[n].content_key, suite=name,
                        inputs=inputs[suite], score=score))  # fmt: skip
                scores[n] |= got
    models = tuple(
        ModelEval(label=i.label, model=i.model, content_key=i.content_key, alpha=i.alpha,
                  suites={s.value: have[s.value] for s in request.suites if s.value in have})
        for i, have in zip(items, scores, strict=True)
    )  # fmt: skip
    return EvalReport(spec=request, models=models)


def _stored(runner: JobRunner, rec: JobRecord, keys: dict[SuiteName, str]) -> dict[str, SuiteScore]:
    """The scores already in the store (a damaged record is set aside and scored again)."""

    def notice(message: str) -> object:
        return runner.records.add_event(rec, "status", message)

    out = {}
    for suite, key in keys.items():
        if (stored := read_score(runner.store, key, notice=notice)) is not None:
            out[suite.value] = stored.score
    return out


def _target(local: LocalModel, chat_dir: Path) -> EvalTarget:
    from app.evals.models import EvalTarget

    inline = local.inline
    return EvalTarget(
        model=str(local.path),
        chat_template_from=str(chat_dir),
        inline_residual=str(inline.residual_dir) if inline else None,
        inline_alpha=inline.alpha if inline else 1.0,
    )


def _evaluate(
    runner: JobRunner,
    rec: JobRecord,
    targets: list[EvalTarget],
    request: EvalRequest,
    cancel: threading.Event,
) -> list[dict[str, SuiteScore]]:
    """Run the suites; each suite's start and end go to the job's events, and a cancel
    (or a lost lease) stops the evaluation's processes."""
    from app.evals.models import EvalProgress, EvalSpec
    from app.evals.runner import evaluate_models

    spec = EvalSpec.model_validate(request.model_dump(exclude={"compare"}))
    seen: set[tuple[str, str]] = set()

    def progress(p: EvalProgress) -> None:
        if cancel.is_set():
            raise OperationCancelledError("evaluation cancelled")
        step = (p.model, p.suite)
        if step not in seen or (p.total and p.done == p.total):
            seen.add(step)
            state = f" {p.done}/{p.total}" if p.total else ""
            runner.records.add_event(rec, "log", f"{p.model}: {p.suite}{state} {p.message}")

    return evaluate_models(targets, spec, progress=progress, cancel=cancel)


def _plan_line(item: EvalItem, cached: dict[str, SuiteScore], todo: tuple[SuiteName, ...]) -> str:
    done = f"; cached: {', '.join(cached)}" if cached else ""
    run = ", ".join(s.value for s in todo) or "nothing"
    return f"{item.label} ({item.model}): evaluating {run}{done}"


def _inputs(suite: SuiteName, request: EvalRequest, chat: str) -> dict[str, object]:
    """What a suite's score depends on besides the weights: the limits, the budget, the
    chat format, the text files' and task directory's contents (equal inputs, equal key)."""
    inputs: dict[str, object] = {
        "limit": request.limit,
        "max_tokens": request.max_tokens,
        "chat": chat,
    }
    if suite is SuiteName.perplexity:
        inputs["texts"] = {k: _file_digest(Path(v)) for k, v in sorted(request.texts.items())}
    if suite is SuiteName.custom and request.tasks_dir:
        inputs["tasks"] = sorted(request.tasks)
        inputs["tasks_dir"] = _dir_digest(Path(request.tasks_dir))
    return inputs


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


# What makes a chat format: the tokenizer, the template, the stop tokens (a model's assets).
_CHAT_FILES = ASSET_NAMES


def _dir_digest(root: Path, names: tuple[str, ...] | None = None) -> str:
    """sha256 over the files of ``root`` (only ``names`` when given, those present)."""
    h = hashlib.sha256()
    files = [root / n for n in names] if names else list(root.rglob("*"))
    for p in sorted(q for q in files if q.is_file()):
        h.update(f"{p.relative_to(root)}\0{_file_digest(p)}\0".encode())
    return h.hexdigest()


def _served_items(runner: JobRunner, entry: ModelEntry, request: EvalRequest) -> list[EvalItem]:
    from app.serving.sources import source_of

    source = source_of(entry, runner.store, runner.settings.trusted_code_sha256)
    # An in-engine merge is keyed by what it computes: pack, target's content, alpha (as a
    # sweep keys its alphas), so a target changed in place is evaluated afresh.
    content = entry.merged_key or (
        f"inline-{entry.residual_key}-{_ref_digest(runner, entry.target)}-{entry.alpha!r}"
    )
    items = [EvalItem("merge", entry.id, content, source.open)]
    if request.compare and entry.merged_key:
        with runner.store.using(entry.merged_key, "merged") as path:
            manifest = read_merge_manifest(Path(path))
        sources = {"base": manifest.base, "instruct": manifest.instruct, "target": manifest.target}
        items += reference_items(runner, sources, request.compare)
    elif request.compare:  # an in-engine merge: its inputs by ref, hashed when opened
        refs = {"base": entry.base, "instruct": entry.instruct, "target": entry.target}
        items += [_ref_item(runner, name, refs[name], None) for name in request.compare]
    return items


def reference_items(
    runner: JobRunner, sources: Mapping[str, SourceInfo], compare: Iterable[str]
) -> list[EvalItem]:
    """The merge inputs named in ``compare``, from their recorded refs and digests."""
    return [_ref_item(runner, name, sources[name].ref, sources[name].digest) for name in compare]


def _ref_item(runner: JobRunner, label: str, ref: str, digest: str | None) -> EvalItem:
    from app.engines.source import LocalModel
    from app.store.inputs import resolve_input

    def opener() -> contextlib.AbstractContextManager[LocalModel]:
        resolved = resolve_input(ref, runner.store, runner.settings.trusted_code_sha256)
        return contextlib.nullcontext(LocalModel(resolved.path))

    return EvalItem(label, ref, digest or _ref_digest(runner, ref), opener)


def _dir_item(runner: JobRunner, ref: str) -> EvalItem:
    return _ref_item(runner, "model", ref, None)


def _ref_digest(runner: JobRunner, ref: str) -> str:
    """The content digest of a model ref (its files' sha256s, from the hash cache)."""
    from app.residuals.sources import local_source
    from app.store.inputs import resolve_input

    resolved = resolve_input(ref, runner.store, runner.settings.trusted_code_sha256)
    if not resolved.path.is_dir():
        raise ModelNotFoundError(f"{ref}: no such model directory")
    return local_source(resolved.path, runner.store.hasher).digest
