"""Cheap checks of an evaluation request, before it is queued (the API's side)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

from app.core.errors import InvalidRefError, ModelNotFoundError
from app.evals.models import EvalJob, EvalRequest, SuiteName
from app.handoff.entry import ModelEntry


class FileCheck(Protocol):
    def __call__(self, text: str, what: str, *, directory: bool = False) -> None: ...


def check_eval_request(request: EvalRequest, check_file: FileCheck) -> None:
    """The request's own inputs: perplexity texts, a custom task directory.

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
    if request.tasks_dir:
        check_file(request.tasks_dir, "tasks_dir", directory=True)
    for name, path in request.texts.items():
        check_file(path, f"texts.{name}")


def check_eval_job(
    job: EvalJob,
    models: Sequence[ModelEntry],
    check_ref: Callable[[str], None],
    check_file: FileCheck,
) -> None:
    """An eval job: its model is a served id or an allowed model ref; ``compare`` needs a
    model a merge registered (its inputs are known).

    Raises:
        ModelNotFoundError: neither a served id nor an allowed model directory.
        InvalidRefError: ``compare`` on a model no merge made.
    """
    check_eval_request(job.request, check_file)
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
