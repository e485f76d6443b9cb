"""Admin views: every caller's jobs, workers, queue depths, the store; the admin page."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Query
from fastapi.responses import FileResponse

from app.api.deps import AdminDep, ServiceDep
from app.api.schemas.errors import error_responses
from app.api.schemas.jobs import MergeList, QueuePublic, WorkerPublic
from app.jobs.models import JobStatus

router = APIRouter(prefix="/admin", tags=["admin"], responses=error_responses(401, 403))

STATIC_DIR = Path(__file__).resolve().parent.parent / "static"
# The page holds no data (it fetches /admin/jobs with the key the user gives it), so it
# is served without auth but locked down: own scripts only, no framing, no referrer.
# A report the page opens (fetched with the key, shown from a blob: URL) inherits this
# policy: its inline styles and data: plots are allowed, no other source is.
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; "
    "style-src 'self' 'unsafe-inline'; connect-src 'self'; img-src 'self' data:; "
    "base-uri 'none'; form-action 'none'; "
    "frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


@router.get("/jobs", summary="Every caller's jobs, newest first", responses=error_responses(422))
def admin_jobs(
    service: ServiceDep,
    admin: AdminDep,
    status: JobStatus | None = None,
    offset: Annotated[int, Query(ge=0, le=1_000_000)] = 0,
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
) -> MergeList:
    page = service.list(admin, status=status, all_callers=True, offset=offset, limit=limit)
    return MergeList.from_page(page, offset, limit)


@router.get("/workers", summary="Live workers")
def admin_workers(service: ServiceDep, _: AdminDep) -> list[WorkerPublic]:
    return [WorkerPublic.model_validate(w.model_dump()) for w in service.workers()]


@router.get("/queue", summary="Messages waiting per queue")
def admin_queue(service: ServiceDep, _: AdminDep) -> QueuePublic:
    return QueuePublic(queues=service.queue_depths())


@router.get("/store", summary="Artifact store usage")
def admin_store(service: ServiceDep, _: AdminDep) -> dict[str, Any]:
    return service.store_usage()


@router.get("", include_in_schema=False)
def admin_page() -> FileResponse:
    return FileResponse(STATIC_DIR / "admin.html", headers=PAGE_HEADERS)


@router.get("/assets/{name}", include_in_schema=False)
def admin_asset(name: str) -> FileResponse:
    assets = {"admin.js": "text/javascript", "admin.css": "text/css"}
    if name not in assets:  # a fixed list: no path from the URL reaches the filesystem
        raise HTTPException(404, f"No admin asset {name!r}.")
    return FileResponse(STATIC_DIR / name, media_type=assets[name], headers=PAGE_HEADERS)
