"""Evaluation values shared by the suites, the eval jobs, the alpha sweep and the report.

A run evaluates one or more *models* (a merge, its references, or one model per alpha of a
sweep) on one or more *suites*; each suite gives a few named metrics with a stated
direction, and one headline metric the report plots.
"""

from __future__ import annotations

import math
from datetime import UTC, datetime
from enum import StrEnum
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


class SuiteName(StrEnum):
    """The built-in suites (``custom`` runs a user's own lm-eval task directory)."""

    chat_format = "format"
    ifeval_lite = "ifeval-lite"
    perplexity = "perplexity"
    custom = "custom"


# What the report plots for each suite, and whether higher is better.
HEADLINE: dict[SuiteName, tuple[str, bool]] = {
    SuiteName.chat_format: ("format", True),
    SuiteName.ifeval_lite: ("prompt_strict", True),
    SuiteName.perplexity: ("ppl_general", False),
}


# A file path as text: no control characters (NUL above all would reach the filesystem).
PathText = Annotated[str, Field(min_length=1, max_length=4096, pattern=r"^[^\x00-\x1f\x7f]+$")]
# A text set's name: `general` is the shipped set's.
TextName = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[\w.-]+$")]


class EvalSpec(BaseModel):
    """What to evaluate a model on: suites and their inputs (references only)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    suites: tuple[SuiteName, ...] = Field(
        default=(SuiteName.chat_format, SuiteName.ifeval_lite),
        min_length=1,
        description="Suites to run, in order.",
    )
    texts: dict[TextName, PathText] = Field(
        default_factory=dict,
        max_length=32,
        description="perplexity: name -> text file (e.g. the new domain data); a "
        "general text set shipped with Realign is always scored as `general`.",
    )
    tasks_dir: PathText | None = Field(
        default=None, description="custom: a directory of lm-eval task YAML files."
    )
    tasks: tuple[str, ...] = Field(default=(), description="custom: task names to run.")
    limit: int | None = Field(
        default=None, ge=1, description="At most this many examples per suite."
    )
    max_tokens: int = Field(default=128, ge=1, le=8192, description="Reply budget.")
    concurrency: int = Field(
        default=8, ge=1, le=256, description="Requests in flight against the engine."
    )

    @field_validator("texts")
    @classmethod
    def _not_general(cls, texts: dict[str, str]) -> dict[str, str]:
        if "general" in texts:
            raise ValueError("'general' names the shipped general text: call yours otherwise")
        return texts


class EvalTarget(BaseModel):
    """What to evaluate: a model served at ``base_url``, or a model directory (an engine
    is started for it on loopback). References only, so it can cross the queue."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    model: str = Field(
        description="The served model id (with base_url), else the model's directory."
    )
    base_url: str | None = Field(
        default=None,
        description="An OpenAI-compatible server (root, /v1 or the chat completions URL) "
        "serving `model`; None: `model` is a directory and an engine is started for it.",
    )
    model_dir: str | None = Field(
        default=None,
        description="The model's weights directory, for perplexity (and custom "
        "log-likelihood tasks); defaults to `model` when that is a directory.",
    )
    chat_template_from: str | None = Field(
        default=None,
        description="A directory whose tokenizer, chat template and stop tokens the "
        "started engine uses (e.g. the instruct model's, to score a base model in its "
        "chat format); default: the model's own.",
    )
    api_key: str | None = Field(
        default=None, repr=False, description="Bearer token for base_url, if it needs one."
    )
    inline_residual: str | None = Field(
        default=None,
        description="A residual pack directory: the weights are then model_dir + "
        "inline_alpha x this residual, merged in the engine as it loads (and in memory "
        "for perplexity) — no checkpoint is written (the alphas of a sweep).",
    )
    inline_alpha: float = Field(default=1.0, ge=-10.0, le=10.0)

    @property
    def weights(self) -> str | None:
        """The weights directory, if known."""
        return self.model_dir or (self.model if self.base_url is None else None)


class EvalProgress(BaseModel):
    """A step of an evaluation: a suite's examples or text sets done so far."""

    model_config = ConfigDict(frozen=True)

    model: str = Field(default="", description="The model (as given in its EvalTarget).")
    suite: str
    done: int = 0
    total: int = 0
    message: str = ""


class SuiteScore(BaseModel):
    """One suite's outcome for one model."""

    model_config = ConfigDict(frozen=True)

    suite: str
    metrics: dict[str, float] = Field(
        description="Named scores, e.g. format: {format, stop_rate, open_rate}; "
        "ifeval-lite: {prompt_strict, instruction_strict}; perplexity: "
        "{ppl_general, ppl_<name>...} (token-level perplexity)."
    )
    higher_is_better: dict[str, bool] = Field(default_factory=dict)
    n: int = Field(ge=0, description="Examples scored.")
    seconds: float = Field(ge=0.0, description="Wall time of the suite.")
    requests_per_s: float | None = Field(
        default=None, description="Generation requests answered per second, if any."
    )

    @field_validator("metrics")
    @classmethod
    def _finite(cls, metrics: dict[str, float]) -> dict[str, float]:
        # NaN/inf (a diverged model, an empty custom metric) would serialise as JSON null
        # and make the record unreadable: such a metric counts as not scored.
        return {k: v for k, v in metrics.items() if math.isfinite(v)}


class ModelEval(BaseModel):
    """Every suite's outcome for one evaluated model."""

    model_config = ConfigDict(frozen=True)

    label: str = Field(description="merge, base, instruct, target, or alpha=0.5 in a sweep.")
    model: str = Field(description="The served model id or the directory evaluated.")
    content_key: str | None = Field(
        default=None, description="Content key of the model's weights (the eval cache key)."
    )
    alpha: float | None = None
    suites: dict[str, SuiteScore] = Field(default_factory=dict)


class EvalReport(BaseModel):
    """A whole evaluation: what was run, each model's scores, and a pick if asked for."""

    model_config = ConfigDict(frozen=True)

    spec: EvalSpec
    models: tuple[ModelEval, ...]
    objective: str | None = Field(
        default=None, description="How the best alpha was chosen, in words (sweeps)."
    )
    chosen: str | None = Field(default=None, description="Label of the model chosen.")
    rejected: dict[str, str] = Field(
        default_factory=dict,
        description="Why the objective left out each alpha it did not consider (sweeps), "
        "by label, e.g. 'ppl_news 1.31x the target's (limit 1.05x)'.",
    )
    created: datetime = Field(default_factory=lambda: datetime.now(UTC))


Reference = Literal["base", "instruct", "target"]


class EvalRequest(EvalSpec):
    """An evaluation asked for with a merge, or by ``POST /v1/evals``: the suites, and the
    merge's inputs to evaluate beside it (each evaluated once per suite: results are
    cached by the model's content key)."""

    compare: tuple[Reference, ...] = Field(
        default=(),
        description="Also evaluate these inputs of the merge, for reference.",
    )


class EvalJob(BaseModel):
    """What an eval job evaluates: a served model id or a model directory (or ref)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    model: str = Field(
        min_length=1,
        max_length=4096,
        pattern=r"^[^\x00-\x1f\x7f]+$",
        description="A served model id (GET /v1/models) or a model directory under an "
        "allowed root (or hf:org/name@rev).",
    )
    request: EvalRequest = Field(default_factory=EvalRequest)
