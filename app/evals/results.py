"""Scores kept next to the model they were measured on: ``DIR/eval/<suite>.json``."""

from __future__ import annotations

import json
import os
import tempfile
from datetime import UTC, datetime
from pathlib import Path

from app.evals.models import EvalSpec, EvalTarget, SuiteScore

RESULTS_DIR = "eval"


def save_scores(
    directory: Path, scores: dict[str, SuiteScore], target: EvalTarget, spec: EvalSpec
) -> list[Path]:
    """Write each score next to the model, ``DIR/eval/<suite>.json``, atomically (a
    temporary file, fsync, then rename), with the model and request it came from."""
    out = directory / RESULTS_DIR
    out.mkdir(parents=True, exist_ok=True)
    written = []
    created = datetime.now(UTC).isoformat()
    for suite, score in scores.items():
        body = {
            "model": target.model,
            "spec": spec.model_dump(mode="json"),
            "created": created,
            **score.model_dump(mode="json"),
        }
        path = out / f"{suite}.json"
        fd, tmp = tempfile.mkstemp(dir=out, prefix=f".{suite}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(body, f, indent=2)
                f.write("\n")
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        written.append(path)
    return written
