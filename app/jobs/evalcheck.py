"""Cheap checks of an evaluation request, before it is queued (the API's side)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol

from app.core.errors import InvalidParameterError, InvalidRefError, ModelNotFoundError
from app.evals.models import HEADLINE, EvalJob, EvalRequest, SuiteName
from app.handoff.entry import ModelEntry
from app.jobs.models import MergeSpec


class FileCheck(Protocol):
    def __call__(self, text: str, what: str, *, directory: bool = False) -> str: ...


def check_eval_request(request: EvalRequest, check_file: FileCheck) -> EvalRequest:
    """The request's own inputs: perplexity texts, a custom task directory; returns the
    request with those paths resolved (what was checked is what the worker reads).

    Raises:
        InvalidRefError: a custom suite without its tasks, or tasks without the suite.
        PathNotAllowedError: a file outside the allowed roots.
        ModelNotFoundError: a file or directory that is not there.
    """
    custom = SuiteName.custom in request.suites
    if custom and not (request.tasks_dir and request.tasks):
        raise InvalidRefError(
            "the custom suite needs tasks_dir (a directory of lm-eval task YAML files) "
            "and tasks (the task names to run)"
        )
    if not custom and (request.tasks_dir or request.tasks):
        raise InvalidRefError("tasks_dir and tasks are for the custom suite: add 'custom'")
    update: dict[str, object] = {}
    if request.tasks_dir:
        tasks_dir = update["tasks_dir"] = check_file(request.tasks_dir, "tasks_dir", directory=True)
        if any(Path(tasks_dir).rglob("*.py")):
            raise InvalidParameterError(
                f"tasks_dir {request.tasks_dir}: holds Python files, which lm-eval would run "
                "(!function) on the worker; the service takes YAML-only task directories "
                "(run code-carrying tasks with `realign eval --tasks-dir` on your own machine)"
            )
    update["texts"] = {
        name: check_file(path, f"texts.{name}") for name, path in request.texts.items()
    }
    return request.model_copy(update=update)


def check_eval_job(
    job: EvalJob,
    models: Sequence[ModelEntry],
    check_ref: Callable[[str], None],
    check_file: FileCheck,
) -> EvalJob:
    """An eval job: its model is a served id or an allowed model ref; ``compare`` needs a
    model a merge registered (its inputs are known).

    Raises:
        ModelNotFoundError: neither a served id nor an allowed model directory.
        InvalidRefError: ``compare`` on a model no merge made.
    """
    job = job.model_copy(update={"request": check_eval_request(job.request, check_file)})
    entry = next((m for m in models if m.id == job.model), None)
    if entry is None:
        if "/" not in job.model and ":" not in job.model:
            raise ModelNotFoundError(
                f"model {job.model!r}: no served model has this id (GET /v1/models lists "
                "them); give a served id or a model directory"
            )
        check_ref(job.model)
    if job.request.compare and entry is None:
        raise InvalidRefError(
            f"compare {list(job.request.compare)}: only a model a merge job made has a "
            f"base, instruct and target to compare with; {job.model!r} is not one"
        )
    return job


def sweep_request(spec: MergeSpec) -> MergeSpec:
    """A sweep's spec made whole: task arithmetic on one residual (what the engine merges
    while it loads), and an evaluation that scores what the objective needs (the suite
    it maximises, and perplexity).

    Raises:
        InvalidParameterError: another method, method params or several residuals.
    """
    sweep = spec.sweep
    assert sweep is not None
    if spec.method != "task_arithmetic" or spec.params or spec.residuals:
        raise InvalidParameterError(
            "an alpha sweep merges one residual by task_arithmetic in the engine for each "
            f"alpha; method {spec.method!r}, method params or several residuals cannot be "
            "swept: give one alpha"
        )
    if sweep.maximize not in HEADLINE or sweep.maximize is SuiteName.perplexity:
        raise InvalidParameterError(
            f"maximize {sweep.maximize.value!r}: a sweep maximises format or ifeval-lite"
        )
    request = spec.eval or EvalRequest(
        suites=(SuiteName.chat_format, SuiteName.ifeval_lite, SuiteName.perplexity)
    )
    wanted = (sweep.maximize, SuiteName.perplexity)
    suites = request.suites + tuple(s for s in wanted if s not in request.suites)
    return spec.model_copy(update={"eval": request.model_copy(update={"suites": suites})})
