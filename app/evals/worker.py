"""The evaluation child process: ``python -m app.evals.worker REQUEST.json``.

Runs the requested suites on each model in turn and writes one JSON event a line on
its standard output (``progress``, ``score``, ``error``, each with the model's index);
everything the libraries print goes to standard error (the log). The parent
(:mod:`app.evals.runner`) starts it with the Hub libraries switched offline, so nothing
in here waits on a download.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from app.core.errors import RealignError
from app.evals.models import EvalProgress, EvalSpec, EvalTarget

LOAD_TIMEOUT_S = 900


def _events() -> IO[str]:
    """The event stream (the original stdout); stdout itself then goes to stderr, where
    libraries' prints cannot be taken for events."""
    stream = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    return stream


def _send(stream: IO[str], event: str, **body: Any) -> None:
    stream.write(json.dumps({"event": event, **body}) + "\n")
    stream.flush()


def _error(exc: Exception) -> tuple[str, str]:
    if isinstance(exc, RealignError):
        return exc.code, exc.message
    traceback.print_exc()
    first = (str(exc).strip().splitlines() or [""])[0][:400]
    return "eval_suite_failed", f"{type(exc).__name__}: {first}" if first else type(exc).__name__


def _load(url: str, emit: Callable[[EvalProgress], None]) -> None:
    """Swap the model into the evaluation endpoint's engine before its first request."""
    import httpx

    emit(EvalProgress(suite="engine", message="loading the model"))
    reply = httpx.post(url, timeout=LOAD_TIMEOUT_S)
    if reply.status_code != 200:
        raise RealignError(f"loading the model failed ({reply.status_code}): {reply.text[:400]}")


def _evaluate(stream: IO[str], index: int, item: dict[str, Any], spec: EvalSpec) -> bool:
    """One model's suites; False after the first failure (its error event sent)."""
    from app.evals.suites import SUITES, Run

    def emit(p: EvalProgress) -> None:
        progress = p.model_copy(update={"model": item["label"]}).model_dump(mode="json")
        _send(stream, "progress", index=index, progress=progress)

    run = Run(target=EvalTarget.model_validate(item["target"]), spec=spec, emit=emit)
    suite = "engine"
    try:
        if item.get("load"):
            _load(item["load"], emit)
        for suite in spec.suites:
            score = SUITES[suite](run)
            _send(stream, "score", index=index, suite=suite, score=score.model_dump(mode="json"))
    except Exception as exc:
        code, message = _error(exc)
        _send(stream, "error", index=index, suite=suite, code=code, message=message)
        return False
    return True


def main(argv: list[str] | None = None) -> int:
    """Run a request file ``{"spec": EvalSpec, "models": [{"target": EvalTarget,
    "label": str, "load": URL (optional)}, ...]}``."""
    args = sys.argv[1:] if argv is None else argv
    request = json.loads(Path(args[0]).read_text())
    spec = EvalSpec.model_validate(request["spec"])
    stream = _events()
    for index, item in enumerate(request["models"]):
        if not _evaluate(stream, index, item, spec):
            return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
