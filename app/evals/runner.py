"""Evaluate one model: the entry point of ``realign eval`` and of eval jobs.

:func:`evaluate_model` checks the request, starts a loopback engine for a directory that
no server serves (:class:`~app.evals.endpoint.Endpoint`), and runs the suites in a child
process (:mod:`app.evals.worker`) whose environment keeps the Hub libraries offline —
so this process's own settings (a worker that downloads Hub models for merges) are left
alone, and the evaluation's memory goes with the child. Progress arrives as events;
a progress callback that raises (e.g. ``OperationCancelledError``) stops the child and
the engine. Both children, and what they start, end with this process even when it is
SIGKILLed (:mod:`app.core.lifeline`).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from app.core import lifeline
from app.core.errors import (
    InvalidParameterError,
    ModelNotFoundError,
    OperationCancelledError,
    RealignError,
)
from app.evals.endpoint import Endpoint, EndpointError, Served, served_ids
from app.evals.models import EvalProgress, EvalSpec, EvalTarget, SuiteName, SuiteScore
from app.evals.offline import offline_env

ProgressFn = Callable[[EvalProgress], None]
TEMPLATE_SUITES = frozenset({SuiteName.chat_format, SuiteName.ifeval_lite})
# custom's generation tasks chat too (its log-likelihood tasks read the weights).
CHAT_SUITES = TEMPLATE_SUITES | {SuiteName.custom}


class EvalFailedError(RealignError, RuntimeError):
    """A suite failed; the message names it, says why, and where the log is."""

    code = "eval_failed"
    http_status = 500


def has_chat_template(model_dir: Path) -> bool:
    """Whether a model directory ships a chat template (in its tokenizer config or a
    ``chat_template.jinja`` / ``.json`` file)."""
    if any((model_dir / n).is_file() for n in ("chat_template.jinja", "chat_template.json")):
        return True
    config = model_dir / "tokenizer_config.json"
    return config.is_file() and bool(json.loads(config.read_text()).get("chat_template"))


def check_request(target: EvalTarget, spec: EvalSpec) -> None:
    """Refuse, before anything starts, a request that cannot run.

    Raises:
        ModelNotFoundError: a directory or text file that is not there.
        InvalidParameterError: a suite without what it needs.
    """
    weights = Path(target.weights) if target.weights else None
    if weights is not None and not (weights / "config.json").is_file():
        raise ModelNotFoundError(f"{weights}: no config.json — not a model directory")
    for name, path in spec.texts.items():
        if not Path(path).is_file():
            raise ModelNotFoundError(f"text {name!r}: {path} is not a file")
    if SuiteName.perplexity in spec.suites and weights is None:
        raise InvalidParameterError(
            "perplexity scores the weights: give the served model's directory too "
            "(--model-dir, `model_dir`)"
        )
    if SuiteName.custom in spec.suites and not (spec.tasks_dir and spec.tasks):
        raise InvalidParameterError("the custom suite needs a task directory and task names")
    if spec.tasks_dir and not Path(spec.tasks_dir).is_dir():
        raise ModelNotFoundError(f"task directory {spec.tasks_dir} does not exist")
    chats = TEMPLATE_SUITES.intersection(spec.suites)
    if target.base_url is None and chats and weights is not None:
        template = Path(target.chat_template_from) if target.chat_template_from else weights
        if not has_chat_template(template):
            raise InvalidParameterError(
                f"{template} has no chat template, and the {'/'.join(sorted(chats))} suites "
                "chat with the model: score it in another model's chat format with "
                "--chat-template-from DIR (`chat_template_from`), e.g. the instruct model's"
            )


def _server_root(base_url: str) -> str:
    url = base_url.rstrip("/").removesuffix("/chat/completions")
    return url.removesuffix("/v1")


def check_served(target: EvalTarget) -> None:
    """The server at ``target.base_url`` answers and serves ``target.model``.

    Raises:
        EndpointError: nothing answers there.
        ModelNotFoundError: it does not serve the model.
    """
    import httpx

    assert target.base_url is not None
    url = f"{_server_root(target.base_url)}/v1/models"
    headers = {"Authorization": f"Bearer {target.api_key}"} if target.api_key else {}
    try:
        reply = httpx.get(url, headers=headers, timeout=30)
    except httpx.HTTPError as exc:
        raise EndpointError(f"nothing answers at {url}: {exc}") from None
    if reply.status_code != 200:
        raise EndpointError(f"GET {url} answered {reply.status_code}: {reply.text[:300]}")
    ids = [m.get("id") for m in reply.json().get("data", [])]
    if target.model not in ids:
        raise ModelNotFoundError(
            f"{target.base_url} does not serve {target.model!r}; it serves: "
            f"{', '.join(map(str, ids)) or 'nothing'}"
        )


def evaluate_model(
    target: EvalTarget,
    spec: EvalSpec,
    *,
    progress: ProgressFn | None = None,
    log_dir: Path | None = None,
    cancel: threading.Event | None = None,
) -> dict[str, SuiteScore]:
    """Run ``spec``'s suites on one model (see :func:`evaluate_models`).

    Returns:
        Suite name -> its score, in ``spec.suites`` order.
    """
    return evaluate_models([target], spec, progress=progress, log_dir=log_dir, cancel=cancel)[0]


def evaluate_models(
    targets: Sequence[EvalTarget],
    spec: EvalSpec,
    *,
    progress: ProgressFn | None = None,
    log_dir: Path | None = None,
    cancel: threading.Event | None = None,
) -> list[dict[str, SuiteScore]]:
    """Run ``spec``'s suites on each model in turn.

    Directories share one engine on loopback (vLLM when installed, else transformers):
    each is swapped in before its suites — in place when it has the shapes of the one
    before, as a merge and its references do.

    Args:
        targets: served models (``base_url`` + id) and/or model directories.
        spec: the suites and their inputs.
        progress: called with each step (engine start, model load, examples done);
            raising in it stops the evaluation (the child and the engine are stopped).
        log_dir: keeps ``engine.log`` and ``eval.log`` (default: a temporary directory,
            removed afterwards; a failure's message quotes the log's end).
        cancel: set it from any thread to stop the evaluation within a fraction of a
            second, also while the engine starts or between progress steps.

    Returns:
        For each target, suite name -> its score, in ``spec.suites`` order.

    Raises:
        OperationCancelledError: ``cancel`` was set (or ``progress`` raised it).
        InvalidParameterError, ModelNotFoundError: a request that cannot run.
        EndpointError: the engine did not start, or a server does not answer.
        EvalFailedError: a suite failed.
    """
    for target in targets:
        check_request(target, spec)
    report = progress or (lambda p: None)
    with ExitStack() as stack:
        logs = log_dir or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="eval-")))
        logs.mkdir(parents=True, exist_ok=True)
        models: list[dict[str, Any]] = [{"target": t, "label": t.model} for t in targets]
        local = [m for m in models if m["target"].base_url is None]
        if local and CHAT_SUITES.intersection(spec.suites):
            _serve(local, logs, stack, report, cancel)
        for target in targets:
            if target.base_url is not None:
                check_served(target)
        return _run_child(models, spec, logs, report, cancel)


def _serve(
    models: list[dict[str, Any]],
    logs: Path,
    stack: ExitStack,
    report: ProgressFn,
    cancel: threading.Event | None,
) -> None:
    """Start one endpoint for the directories, and point their targets at it."""
    ids = served_ids([Path(m["target"].model) for m in models])
    served = {i: _served(m["target"]) for i, m in zip(ids, models, strict=True)}
    first = models[0]["label"]
    report(EvalProgress(model=first, suite="engine", message="starting an engine"))
    endpoint = stack.enter_context(Endpoint(served, logs / "engine.log", cancel=cancel))
    report(EvalProgress(model=first, suite="engine", message=f"up at {endpoint.base_url}"))
    for i, (served_id, m) in enumerate(zip(ids, models, strict=True)):
        target: EvalTarget = m["target"]
        update = {"base_url": endpoint.base_url, "model": served_id, "model_dir": target.weights}
        m["target"] = target.model_copy(update=update)
        m["load"] = f"{endpoint.base_url}/eval/load/{served_id}" if i else None


def _served(target: EvalTarget) -> Served:
    from app.engines.base import InlineMerge

    path = Path(target.model)
    inline = None
    if target.inline_residual:
        inline = InlineMerge(Path(target.inline_residual), path, target.inline_alpha)
    return Served(path, _path(target.chat_template_from), inline)


def _path(value: str | None) -> Path | None:
    return Path(value) if value else None


def _write_private(path: Path, text: str) -> None:
    """Write ``text`` readable by this user only (a request may hold an API key)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)


def _watch(proc: subprocess.Popen[str], cancel: threading.Event, done: threading.Event) -> None:
    """Kill ``proc`` (and what it started) when ``cancel`` is set before ``done``."""
    while not done.wait(0.2):
        if cancel.is_set():
            lifeline.kill(proc)
            return


def _run_child(
    models: list[dict[str, Any]],
    spec: EvalSpec,
    logs: Path,
    report: ProgressFn,
    cancel: threading.Event | None,
) -> list[dict[str, SuiteScore]]:
    request = logs / "request.json"
    body = {
        "spec": spec.model_dump(mode="json"),
        "models": [{**m, "target": m["target"].model_dump(mode="json")} for m in models],
    }
    _write_private(request, json.dumps(body))
    log = logs / "eval.log"
    done = threading.Event()
    scores: list[dict[str, SuiteScore]] = [{} for _ in models]
    failure: dict[str, Any] | None = None
    with log.open("wb") as sink:
        proc = lifeline.spawn(
            [sys.executable, "-m", "app.evals.worker", str(request)],
            stdout=subprocess.PIPE,
            stderr=sink,
            stdin=subprocess.DEVNULL,
            env=offline_env(),
            text=True,
        )
        if cancel is not None:
            threading.Thread(target=_watch, args=(proc, cancel, done), daemon=True).start()
        try:
            assert proc.stdout is not None
            for line in proc.stdout:
                event = json.loads(line)
                if event["event"] == "progress":
                    report(EvalProgress.model_validate(event["progress"]))
                elif event["event"] == "score":
                    score = SuiteScore.model_validate(event["score"])
                    scores[event["index"]][event["suite"]] = score
                elif event["event"] == "error":
                    failure = {**event, "label": models[event["index"]]["label"]}
            proc.wait()
        except BaseException:
            lifeline.stop(proc, grace=0)
            raise
        finally:
            done.set()
            request.unlink(missing_ok=True)
    if cancel is not None and cancel.is_set():
        raise OperationCancelledError("evaluation cancelled; no score was kept")
    if failure is not None or proc.returncode != 0:
        raise _failed(failure, proc.returncode, log)
    return scores


def _failed(failure: dict[str, Any] | None, code: int, log: Path) -> RealignError:
    tail = " | ".join(log.read_text(errors="replace").strip().splitlines()[-4:])
    if failure is None:
        return EvalFailedError(f"the evaluation process exited ({code}): {tail}")
    message = f"{failure['label']}: suite {failure['suite']}: {failure['message']}"
    if failure.get("code") in (InvalidParameterError.code, ModelNotFoundError.code):
        return InvalidParameterError(message)
    return EvalFailedError(message)
