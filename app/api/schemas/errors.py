"""OpenAI's error body, used by every non-2xx response of the API."""

from __future__ import annotations

from pydantic import BaseModel, Field


class ErrorDetail(BaseModel):
    message: str = Field(examples=["No job with id job_0f3a visible to this API key."])
    type: str = Field(examples=["not_found_error"])
    param: str | None = Field(default=None, examples=[None])
    code: str | None = Field(default=None, examples=["job_not_found"])


class ErrorResponse(BaseModel):
    """``{"error": {"message", "type", "param", "code"}}``, as OpenAI's API answers."""

    error: ErrorDetail


def error_responses(*statuses: int) -> dict[int | str, dict[str, object]]:
    """OpenAPI ``responses=`` entries documenting error statuses with the shared body."""
    return {status: {"model": ErrorResponse} for status in statuses}
