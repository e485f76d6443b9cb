"""API schemas of eval jobs: evaluate a served model or a model directory on suites."""

from __future__ import annotations

from typing import Any

from pydantic import ConfigDict, Field

from app.api.schemas.jobs import RefText
from app.evals.models import EvalJob, EvalRequest

_EVAL_EXAMPLE: dict[str, Any] = {
    "model": "realign-3f9a2c41d07b",
    "suites": ["format", "ifeval-lite", "perplexity"],
    "texts": {"news": "/models/data/news-2026.txt"},
    "compare": ["base", "instruct", "target"],
}


class EvalCreate(EvalRequest):
    """Evaluate ``model`` on ``suites``; ``compare`` also evaluates the inputs of the merge
    that made it (a served model registered by a merge job)."""

    model_config = ConfigDict(
        frozen=True, extra="forbid", json_schema_extra={"examples": [_EVAL_EXAMPLE]}
    )

    model: RefText = Field(
        description="A served model id (GET /v1/models) or a model directory under an "
        "allowed root (or hf:org/name@rev).",
        examples=["realign-3f9a2c41d07b"],
    )

    def to_job(self) -> EvalJob:
        request = EvalRequest.model_validate(self.model_dump(exclude={"model"}))
        return EvalJob(model=self.model, request=request)
