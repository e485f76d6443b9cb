"""Eval jobs: submit, inspect, follow, cancel, and the HTML report of their scores."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Header, Request, Response
from fastapi.responses import HTMLResponse, StreamingResponse

from app.api.deps import CallerDep, ServiceDep
from app.api.routes.merges import IdempotencyKey, JobId, follow_events
from app.api.schemas.errors import error_responses
from app.api.schemas.evals import EvalCreate
from app.api.schemas.jobs import EventPublic, MergePublic
from app.evals.report import CSP

router = APIRouter(tags=["evals"])


@router.post(
    "/v1/evals",
    status_code=202,
    responses={
        200: {"model": MergePublic, "description": "Attached to an identical job."},
        **error_responses(400, 401, 403, 404, 409, 413, 422, 429),
    },
    summary="Submit an eval job",
    operation_id="create_eval",
)
def create_eval(
    body: EvalCreate,
    service: ServiceDep,
    caller: CallerDep,
    response: Response,
    idempotency_key: IdempotencyKey = None,
) -> MergePublic:
    """Queue an evaluation of a served model or a model directory; 202 with the job."""
    record, created = service.submit_eval(body.to_job(), caller, idempotency_key)
    response.status_code = 202 if created else 200
    response.headers["Location"] = f"/v1/evals/{record.id}"
    return MergePublic.from_record(record)


@router.get("/v1/evals/{job_id}", responses=error_responses(401, 404), summary="Get an eval job")
def get_eval(job_id: JobId, service: ServiceDep, caller: CallerDep) -> MergePublic:
    return MergePublic.from_record(service.get(job_id, caller))


@router.get(
    "/v1/evals/{job_id}/events",
    response_model=list[EventPublic],
    responses=error_responses(401, 404),
    summary="An eval job's events (JSON, or live SSE)",
)
def eval_events(
    job_id: JobId,
    request: Request,
    service: ServiceDep,
    caller: CallerDep,
    after: int = 0,
    last_event_id: Annotated[int | None, Header(alias="Last-Event-ID", ge=0)] = None,
) -> list[EventPublic] | StreamingResponse:
    return follow_events(job_id, request, service, caller, max(after, last_event_id or 0))


@router.post(
    "/v1/evals/{job_id}/cancel",
    responses=error_responses(401, 404, 409),
    summary="Cancel a queued or running eval job",
)
def cancel_eval(job_id: JobId, service: ServiceDep, caller: CallerDep) -> MergePublic:
    return MergePublic.from_record(service.cancel(job_id, caller))


@router.get(
    "/v1/evals/{job_id}/report",
    response_class=HTMLResponse,
    responses={
        200: {"content": {"text/html": {}}, "description": "A self-contained HTML page."},
        **error_responses(401, 404, 409),
    },
    summary="The HTML report of a job's evaluation (eval jobs and merges that asked one)",
)
def eval_report(job_id: JobId, service: ServiceDep, caller: CallerDep) -> HTMLResponse:
    headers = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff"}
    return HTMLResponse(service.report_html(job_id, caller), headers=headers)
