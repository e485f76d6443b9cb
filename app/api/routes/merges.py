"""Merge jobs: submit, inspect, list, follow (JSON or SSE) and cancel."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Header, Path, Query, Request, Response
from fastapi.responses import StreamingResponse

from app.api.deps import CallerDep, ServiceDep
from app.api.schemas.errors import error_responses
from app.api.schemas.jobs import EventPublic, MergeCreate, MergeList, MergePublic
from app.api.sse import job_event_stream
from app.jobs.models import JobStatus

router = APIRouter(tags=["merges"])

JobId = Annotated[str, Path(max_length=64, pattern=r"^[\w-]+$", examples=["mrg_0f3a9c"])]
IdempotencyKey = Annotated[
    str | None,
    Header(
        alias="Idempotency-Key",
        max_length=255,
        description="Retrying with the same key returns the job of the first request.",
    ),
]
Offset = Annotated[int, Query(ge=0, le=1_000_000)]
Limit = Annotated[int, Query(ge=1, le=200)]

_SUBMIT_RESPONSES: dict[int | str, dict[str, object]] = {
    200: {"model": MergePublic, "description": "Attached to an identical job already queued."},
    **error_responses(400, 401, 403, 404, 409, 413, 422, 429),
}
_SSE_RESPONSE: dict[int | str, dict[str, object]] = {
    200: {
        "description": "Events as JSON, or live as SSE with `Accept: text/event-stream` "
        "(`event: <kind>`, `data: <EventPublic>`, ends when the job ends).",
        "content": {"text/event-stream": {"schema": {"type": "string"}}},
    },
    **error_responses(401, 404),
}


@router.post(
    "/v1/merges",
    status_code=202,
    responses=_SUBMIT_RESPONSES,
    summary="Submit a merge job",
    operation_id="create_merge",
)
def create_merge(
    body: MergeCreate,
    service: ServiceDep,
    caller: CallerDep,
    response: Response,
    idempotency_key: IdempotencyKey = None,
) -> MergePublic:
    """Queue ``target + alpha * (instruct - base)``; 202 with the new job."""
    record, created = service.submit(body.to_spec(), caller, idempotency_key)
    response.status_code = 202 if created else 200
    response.headers["Location"] = f"/v1/merges/{record.id}"
    return MergePublic.from_record(record)


router.add_api_route(
    "/merge",
    create_merge,
    methods=["POST"],
    status_code=202,
    responses=_SUBMIT_RESPONSES,
    summary="Submit a merge job (alias of POST /v1/merges)",
    operation_id="create_merge_alias",
)


@router.get("/v1/merges", responses=error_responses(401, 422), summary="List your merge jobs")
def list_merges(
    service: ServiceDep,
    caller: CallerDep,
    status: JobStatus | None = None,
    offset: Offset = 0,
    limit: Limit = 50,
) -> MergeList:
    page = service.list(caller, status=status, offset=offset, limit=limit)
    return MergeList.from_page(page, offset, limit)


@router.get("/v1/merges/{job_id}", responses=error_responses(401, 404), summary="Get a job")
def get_merge(job_id: JobId, service: ServiceDep, caller: CallerDep) -> MergePublic:
    return MergePublic.from_record(service.get(job_id, caller))


@router.get(
    "/v1/merges/{job_id}/events",
    response_model=list[EventPublic],
    responses=_SSE_RESPONSE,
    summary="A job's events (JSON, or live SSE)",
)
def merge_events(
    job_id: JobId,
    request: Request,
    service: ServiceDep,
    caller: CallerDep,
    after: Annotated[int, Query(ge=0, description="Only events with seq > after.")] = 0,
    last_event_id: Annotated[int | None, Header(alias="Last-Event-ID", ge=0)] = None,
) -> list[EventPublic] | StreamingResponse:
    return follow_events(job_id, request, service, caller, max(after, last_event_id or 0))


@router.post(
    "/v1/merges/{job_id}/cancel",
    responses=error_responses(401, 404, 409),
    summary="Cancel a queued or running job",
)
def cancel_merge(job_id: JobId, service: ServiceDep, caller: CallerDep) -> MergePublic:
    return MergePublic.from_record(service.cancel(job_id, caller))


def follow_events(
    job_id: str, request: Request, service: ServiceDep, caller: CallerDep, start: int
) -> list[EventPublic] | StreamingResponse:
    """A job's events after ``start``: JSON, or live SSE when the client accepts it."""
    events = service.events(job_id, caller, start)
    if "text/event-stream" not in request.headers.get("accept", ""):
        return [EventPublic.from_event(e) for e in events]
    stream = job_event_stream(service, job_id, caller, start, events)
    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    return StreamingResponse(stream, media_type="text/event-stream", headers=headers)
