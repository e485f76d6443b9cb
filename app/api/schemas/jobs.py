"""API schemas of merge and residual jobs, named by role (create / public / list)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

from app.core.settings import PackFormat
from app.evals.choose import AlphaSweep
from app.evals.models import EvalJob
from app.jobs.models import (
    JobError,
    JobEvent,
    JobProgress,
    JobRecord,
    JobResult,
    JobStage,
    JobStatus,
    MergeSpec,
    ResidualSpec,
    WorkerInfo,
)


def _no_home(text: str) -> str:
    # The client's "~" means nothing on the server, and expanding it probes server users.
    if text.lstrip().startswith("~"):
        raise ValueError(
            "'~' is not expanded on the server: give an absolute path under an allowed "
            "root or hf:org/name@rev"
        )
    return text


# A model reference as text: a path or hf:org/name@rev; control characters (NUL above
# all) are never part of one and would reach the filesystem otherwise.
RefText = Annotated[
    str,
    Field(min_length=1, max_length=4096, pattern=r"^[^\x00-\x1f\x7f]+$"),
    AfterValidator(_no_home),
]

_MERGE_EXAMPLE: dict[str, Any] = {
    "target": "/models/llama-3-8b-news",
    "base": "hf:meta-llama/Meta-Llama-3-8B@main",
    "instruct": "hf:meta-llama/Meta-Llama-3-8B-Instruct@main",
    "alpha": 1.0,
    "dtype": "exact",
    "serve": False,
}


class ResidualItem(ResidualSpec):
    """One residual of a merge of several: a stored ``key``, or ``base`` + ``instruct``."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    key: str | None = Field(
        default=None,
        pattern=r"^[0-9a-f]{6,64}$",
        description="A stored residual key (or unique prefix), instead of base + instruct.",
    )
    base: RefText | None = Field(default=None, examples=["hf:meta-llama/Meta-Llama-3-8B@main"])
    instruct: RefText | None = Field(
        default=None, examples=["hf:meta-llama/Meta-Llama-3-8B-Instruct@main"]
    )

    @model_validator(mode="after")
    def _one_source(self) -> ResidualItem:
        pair = self.base is not None or self.instruct is not None
        if self.key is not None and pair:
            raise ValueError("give either 'key' or 'base' + 'instruct', not both")
        if self.key is None and (self.base is None or self.instruct is None):
            raise ValueError("give 'base' and 'instruct' (or a stored residual 'key')")
        return self


class MergeCreate(MergeSpec):
    """A merge request: ``target + alpha * (instruct - base)``, or a stored ``residual``
    applied to ``target``."""

    model_config = ConfigDict(
        frozen=True, extra="forbid", json_schema_extra={"examples": [_MERGE_EXAMPLE]}
    )

    target: RefText = Field(
        description="The new base: local path under an allowed root, hf:org/name@rev or "
        "s3://bucket/prefix.",
        examples=["/models/llama-3-8b-news"],
    )
    base: RefText | None = Field(default=None, examples=["hf:meta-llama/Meta-Llama-3-8B@main"])
    instruct: RefText | None = Field(
        default=None, examples=["hf:meta-llama/Meta-Llama-3-8B-Instruct@main"]
    )
    residual: str | None = Field(
        default=None,
        pattern=r"^[0-9a-f]{6,64}$",
        description="A stored residual key (or unique prefix), instead of base + instruct.",
    )

    residuals: tuple[ResidualItem, ...] = Field(
        default=(),
        max_length=16,
        description="Several residuals with weights, merged in one pass over the target "
        "(instead of 'residual' or 'base' + 'instruct'); the first one's tokenizer is used.",
        examples=[[{"key": "3f9a2c"}, {"key": "b71e04", "weight": 0.5}]],
    )

    alpha: Annotated[float, Field(ge=-10.0, le=10.0)] | AlphaSweep = Field(  # type: ignore[assignment]
        default=1.0,
        description="The residual's scale, or {'sweep': [0.25, 0.5, 0.75, 1.0]} to merge "
        "each in the engine, evaluate each (the eval suites, by default format, "
        "ifeval-lite and perplexity) and publish the best by the objective: maximise "
        "'maximize' (ifeval-lite) with perplexity <= perplexity_limit (1.05) x the "
        "target's.",
        examples=[0.8, {"sweep": [0.25, 0.5, 0.75, 1.0]}],
    )
    sweep: None = Field(default=None, description="Give a sweep as 'alpha': {'sweep': [...]}.")

    @model_validator(mode="after")
    def _one_source(self) -> MergeCreate:
        pair = self.base is not None or self.instruct is not None
        if self.residuals and (pair or self.residual is not None):
            raise ValueError(
                "give either 'residuals' or one residual ('residual', or 'base' + "
                "'instruct'), not both"
            )
        if self.residuals:
            return self
        if self.residual is not None and pair:
            raise ValueError("give either 'residual' or 'base' + 'instruct', not both")
        if self.residual is None and (self.base is None or self.instruct is None):
            raise ValueError("give 'base' and 'instruct' (or a stored 'residual' key)")
        return self

    def to_spec(self) -> MergeSpec:
        body = self.model_dump()
        if isinstance(self.alpha, AlphaSweep):
            body |= {"alpha": 1.0, "sweep": self.alpha.model_dump()}
        return MergeSpec.model_validate(body)


class ResidualCreate(BaseModel):
    """Compute (or reuse) the residual pack ``instruct - base`` without merging."""

    model_config = ConfigDict(
        frozen=True,
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "base": "hf:meta-llama/Meta-Llama-3-8B@main",
                    "instruct": "hf:meta-llama/Meta-Llama-3-8B-Instruct@main",
                    "dtype": "exact",
                }
            ]
        },
    )

    base: RefText
    instruct: RefText
    dtype: PackFormat | None = Field(
        default=None,
        description="Residual pack format (unset: the service's REALIGN_RESIDUAL_DTYPE).",
    )
    method: str = Field(
        default="task_arithmetic",
        max_length=64,
        pattern=r"^[a-z0-9_]+$",
        description="Merge method the residual is made for (ties and dare share the "
        "task_arithmetic pack).",
    )
    metadata: dict[str, str] = Field(default_factory=dict, max_length=64)
    force: bool = Field(
        default=False,
        description="Compute it even when the lineage check finds the instruct model "
        "unrelated to the base.",
    )

    def to_spec(self) -> MergeSpec:
        return MergeSpec(
            target=None,
            base=self.base,
            instruct=self.instruct,
            dtype=self.dtype,
            method=self.method,
            metadata=self.metadata,
            force=self.force,
        )


class MergePublic(BaseModel):
    """A job as the API shows it (merges and residual-only jobs alike)."""

    object: Literal["merge.job", "eval.job"] = "merge.job"
    id: str
    owner: str
    kind: Literal["merge", "eval"] = Field(
        default="merge", description="merge (and residual-only) jobs, or eval jobs."
    )
    status: JobStatus
    stage: JobStage | None
    spec: MergeSpec
    evaluation: EvalJob | None = Field(
        default=None, description="What an eval job evaluates (kind eval)."
    )
    progress: JobProgress
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    updated_at: datetime
    result: JobResult | None
    error: JobError | None
    deliveries: int = Field(
        description="How many times a worker started the merge (more than one: a worker "
        "died and the job was redelivered; it fails after REALIGN_MAX_DELIVERIES)."
    )
    cancel_requested: bool
    idempotency_key: str | None
    resolved: dict[str, str] = Field(
        default_factory=dict,
        description="Refs pinned at validation: hf:org/name@<commit>, "
        "s3://bucket/prefix@sha256:<content digest>, the full residual key. The merge "
        "used exactly these.",
    )

    @classmethod
    def from_record(cls, record: JobRecord) -> MergePublic:
        obj = "eval.job" if record.kind == "eval" else "merge.job"
        return cls.model_validate(record.model_dump(exclude={"fingerprint"}) | {"object": obj})


class MergeList(BaseModel):
    """One page of jobs, newest first."""

    object: Literal["list"] = "list"
    data: list[MergePublic]
    total: int = Field(description="Jobs matching the filter, over all pages.")
    offset: int
    limit: int

    @classmethod
    def from_page(cls, page: tuple[list[JobRecord], int], offset: int, limit: int) -> MergeList:
        records, total = page
        data = [MergePublic.from_record(r) for r in records]
        return cls(data=data, total=total, offset=offset, limit=limit)


class EventPublic(BaseModel):
    """One step of a job's history; ``seq`` orders them and resumes an SSE stream."""

    seq: int
    at: datetime
    kind: Literal["status", "progress", "log"]
    status: JobStatus
    stage: JobStage | None = None
    progress: JobProgress | None = None
    message: str = ""

    @classmethod
    def from_event(cls, event: JobEvent) -> EventPublic:
        return cls.model_validate(event.model_dump())


class WorkerPublic(WorkerInfo):
    """A live worker: where it runs, which queues it takes, what it is doing."""


class QueuePublic(BaseModel):
    queues: dict[str, int] = Field(description="Messages waiting per queue.")


class ArtifactList(BaseModel):
    object: Literal["list"] = "list"
    data: list[dict[str, Any]]


class ArtifactDeleted(BaseModel):
    id: str
    object: Literal["residual"] = "residual"
    deleted: bool = True
