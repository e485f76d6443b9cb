"""Residual packs: compute one as a job, list, inspect and delete stored packs."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Header, Path, Response

from app.api.deps import AdminDep, CallerDep, ServiceDep
from app.api.schemas.errors import error_responses
from app.api.schemas.jobs import ArtifactDeleted, ArtifactList, MergePublic, ResidualCreate

router = APIRouter(prefix="/v1/residuals", tags=["residuals"])

ResidualKey = Annotated[
    str,
    Path(
        pattern=r"^[0-9a-f]{6,64}$",
        description="A residual key or a unique prefix of one (at least 6 hex digits).",
        examples=["3f9a0c1d2e4b5a69"],
    ),
]


@router.post(
    "",
    status_code=202,
    responses={
        200: {"model": MergePublic, "description": "Attached to an identical queued job."},
        **error_responses(400, 401, 403, 404, 409, 413, 422, 429),
    },
    summary="Compute a residual pack (instruct - base) as a job",
)
def create_residual(
    body: ResidualCreate,
    service: ServiceDep,
    caller: CallerDep,
    response: Response,
    idempotency_key: Annotated[str | None, Header(alias="Idempotency-Key", max_length=255)] = None,
) -> MergePublic:
    record, created = service.submit(body.to_spec(), caller, idempotency_key)
    response.status_code = 202 if created else 200
    response.headers["Location"] = f"/v1/merges/{record.id}"
    return MergePublic.from_record(record)


@router.get("", responses=error_responses(401), summary="List stored residual packs")
def list_residuals(service: ServiceDep, _: CallerDep) -> ArtifactList:
    return ArtifactList(data=service.residuals())


@router.get("/{key}", responses=error_responses(400, 401, 404), summary="A residual's manifest")
def get_residual(key: ResidualKey, service: ServiceDep, _: CallerDep) -> dict[str, Any]:
    return service.residual(key)


@router.delete(
    "/{key}", responses=error_responses(400, 401, 403, 404, 409), summary="Delete a residual"
)
def delete_residual(key: ResidualKey, service: ServiceDep, _: AdminDep) -> ArtifactDeleted:
    service.delete_residual(key)
    return ArtifactDeleted(id=key)
