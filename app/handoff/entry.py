"""A merged model in the catalog: what serving loads, with its provenance."""

from __future__ import annotations

from datetime import UTC, datetime

from pydantic import BaseModel, Field


class ModelEntry(BaseModel):
    """A merged model that serving can load, with its provenance."""

    id: str
    path: str
    merged_key: str
    residual_key: str
    residual_dir: str | None = None  # in-engine merges: no merged checkpoint on disk
    alpha: float
    base: str
    instruct: str
    target: str
    owner: str
    job_id: str
    created_at: datetime = Field(default_factory=lambda: datetime.now(UTC))
    serve: bool = False
    serve_mode: str = "checkpoint"
