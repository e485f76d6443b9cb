"""A merged model in the catalog: what serving loads, with its provenance."""

from __future__ import annotations

from datetime import UTC, datetime

from pydantic import BaseModel, Field


class ModelEntry(BaseModel):
    """A merged model that serving can load, with its provenance.

    Only store keys and model refs: a serving replica on another node loads the model
    from the shared store by them (entries written before carried the worker's paths,
    which are ignored).
    """

    id: str
    merged_key: str  # merged/<key> in the store; "" for an in-engine merge
    residual_key: str  # residuals/<key>; an in-engine merge loads it with the target
    alpha: float
    base: str
    instruct: str
    target: str  # the target's ref (pinned when it came from the Hub or a bucket)
    owner: str
    job_id: str
    created_at: datetime = Field(default_factory=lambda: datetime.now(UTC))
    serve: bool = False
    serve_mode: str = "checkpoint"
    content_key: str = Field(
        default="",
        description="What its evaluation scores are stored under (app.evals.stored) when "
        "it is not the merged key: an in-engine merge's pack, target digest and alpha.",
    )
