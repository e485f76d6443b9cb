"""Job values shared by the API, the job service and the workers."""

from __future__ import annotations

from datetime import UTC, datetime
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictFloat, StrictInt

from app.core.settings import PackFormat
from app.evals.choose import AlphaSweep
from app.evals.models import EvalJob, EvalReport, EvalRequest
from app.residuals.manifest import LineageInfo


class JobStatus(StrEnum):
    queued = "queued"
    validating = "validating"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in (JobStatus.succeeded, JobStatus.failed, JobStatus.cancelled)


class JobStage(StrEnum):
    preflight = "preflight"
    residual = "residual"
    apply = "apply"
    publish = "publish"
    load = "load"
    evaluate = "evaluate"


def utcnow() -> datetime:
    return datetime.now(UTC)


class ResidualSpec(BaseModel):
    """One residual of a merge of several: a stored residual, or a base + instruct pair
    (its pack computed or reused), and its weight."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    key: str | None = Field(default=None, description="A stored residual key (or unique prefix).")
    base: str | None = Field(default=None, examples=["hf:meta-llama/Meta-Llama-3-8B@main"])
    instruct: str | None = Field(
        default=None, examples=["hf:meta-llama/Meta-Llama-3-8B-Instruct@main"]
    )
    weight: float = Field(
        default=1.0, ge=-10.0, le=10.0, description="Scale of this residual in the merge."
    )


# Fields a spec gained after its first release: left out of the request fingerprint while
# at their defaults, so a request sent before and after an upgrade is the same request.
_LATER_FIELDS: dict[str, object] = {
    "method": "task_arithmetic",
    "params": {},
    "residuals": (),
    "force": False,
    "eval": None,
    "sweep": None,
}


class MergeSpec(BaseModel):
    """What to merge: references only (they cross the queue as JSON)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    target: str | None = Field(
        default=None,
        description="The new base: local path under an allowed root or hf:org/name@rev. "
        "Omitted = only compute the residual (POST /v1/residuals).",
        examples=["/models/llama-3-8b-news"],
    )
    base: str | None = Field(default=None, examples=["hf:meta-llama/Meta-Llama-3-8B@main"])
    instruct: str | None = Field(
        default=None, examples=["hf:meta-llama/Meta-Llama-3-8B-Instruct@main"]
    )
    residual: str | None = Field(
        default=None, description="A stored residual key, instead of base + instruct."
    )
    residuals: tuple[ResidualSpec, ...] = Field(
        default=(),
        max_length=16,
        description="Several residuals with weights, merged in one pass over the target "
        "(instead of 'residual' or 'base' + 'instruct'); the first one's tokenizer is used.",
    )
    method: str = Field(
        default="task_arithmetic",
        max_length=64,
        pattern=r"^[a-z0-9_]+$",
        description="Merge method: task_arithmetic (default), ties or dare.",
    )
    params: dict[Annotated[str, Field(max_length=64)], StrictInt | StrictFloat] = Field(
        default_factory=dict,
        max_length=16,
        description="The method's parameters: ties takes density; dare takes drop_rate "
        "and seed. Missing ones take their defaults.",
        examples=[{"density": 0.2}],
    )
    alpha: float = Field(default=1.0, ge=-10.0, le=10.0)
    dtype: PackFormat | None = Field(
        default=None,
        description="Residual pack format (unset: the service's REALIGN_RESIDUAL_DTYPE, "
        "exact by default): exact keeps R = instruct - base exactly, coded smaller than "
        "bf16; bfloat16/float16/float32 round R; int8, int4 and bitdelta code R in 8, 4 or "
        "1 bit with fp32 scales (lossy, opt-in: the manifest records the error). The merged "
        "model keeps the target's dtype.",
    )
    serve: bool = Field(default=False, description="Load the merged model for chat when done.")
    serve_mode: Literal["checkpoint", "in_engine"] = "checkpoint"
    name: str | None = Field(
        default=None,
        max_length=128,
        pattern=r"^[\w.:/-]+$",
        description="Served model id; default realign-<key prefix>.",
    )
    metadata: dict[str, str] = Field(default_factory=dict, max_length=64)
    force: bool = Field(
        default=False,
        description="Merge even when the lineage check finds the instruct model or the "
        "target unrelated to the base (past REALIGN_LINEAGE_MAX_DISTANCE); the figures "
        "are recorded in the result, the manifest and the model card.",
    )
    sweep: AlphaSweep | None = Field(
        default=None,
        description="Set by an 'alpha': {'sweep': [...]} request: each alpha is merged in "
        "the engine and evaluated, and the objective's pick is published (alpha then "
        "holds it).",
    )
    eval: EvalRequest | None = Field(
        default=None,
        description="Evaluate the merged model when it is published (and the inputs "
        "named in compare); the scores come with the job's result and its report "
        "(GET /v1/evals/{id}/report).",
    )

    def fingerprint_json(self) -> str:
        """The spec as JSON for request fingerprints (fields added later left out at their
        defaults, so the fingerprint of an older request does not change)."""
        same = {k for k, v in _LATER_FIELDS.items() if getattr(self, k) == v}
        return self.model_dump_json(exclude=same)


class JobProgress(BaseModel):
    tensors_done: int = 0
    tensors_total: int = 0
    bytes_done: int = 0
    bytes_total: int = 0
    percent: float = 0.0
    eta_seconds: float | None = None


class JobResult(BaseModel):
    model_id: str
    merged_key: str
    residual_key: str
    output: str
    manifest: dict[str, Any]
    lineage: LineageInfo | None = Field(
        default=None,
        description="Figures of the lineage check: relative weight distances of the "
        "instruct model and the target from the base, and the limit applied.",
    )
    evaluation: EvalReport | None = Field(
        default=None, description="Scores of the evaluation the job ran, if any."
    )


class JobError(BaseModel):
    code: str
    message: str


class JobRecord(BaseModel):
    """A merge job as stored (Redis hash or SQLite row) and returned by the API."""

    id: str
    owner: str
    kind: Literal["merge", "eval"] = "merge"
    status: JobStatus = JobStatus.queued
    stage: JobStage | None = None
    spec: MergeSpec = Field(default_factory=MergeSpec)
    evaluation: EvalJob | None = Field(
        default=None, description="What an eval job evaluates (kind eval)."
    )
    progress: JobProgress = Field(default_factory=JobProgress)
    created_at: datetime = Field(default_factory=utcnow)
    started_at: datetime | None = None
    finished_at: datetime | None = None
    updated_at: datetime = Field(default_factory=utcnow)
    result: JobResult | None = None
    error: JobError | None = None
    deliveries: int = 0
    cancel_requested: bool = False
    idempotency_key: str | None = None
    fingerprint: str = ""
    resolved: dict[str, str] = Field(
        default_factory=dict,
        description="Refs pinned at validation (hf:...@<commit>, full residual key), by "
        "spec field; the merge uses these, so one job sees one version of each input.",
    )


EventKind = Literal["status", "progress", "log"]


class JobEvent(BaseModel):
    seq: int
    at: datetime = Field(default_factory=utcnow)
    kind: EventKind
    status: JobStatus
    stage: JobStage | None = None
    progress: JobProgress | None = None
    message: str = ""


class WorkerInfo(BaseModel):
    name: str
    device: str
    queues: list[str]
    pid: int
    current_job: str | None = None
    seen_at: datetime = Field(default_factory=utcnow)


class Caller(BaseModel):
    """Who is asking: the API key's name and role (``local`` admin when auth is off)."""

    model_config = ConfigDict(frozen=True)

    name: str
    role: Literal["user", "admin"] = "user"

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"
