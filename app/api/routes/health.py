"""Probes and metrics: liveness, readiness (503 when not ready), Prometheus text."""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from pydantic import BaseModel

from app.api.deps import AdminDep
from app.api.schemas.errors import error_responses
from app.core.errors import ServiceUnavailableError

router = APIRouter(tags=["health"])


class Health(BaseModel):
    status: Literal["ok"] = "ok"
    detail: str = "alive"


@router.get("/healthz", summary="Liveness: the process answers")
def healthz() -> Health:
    return Health()


@router.get(
    "/readyz",
    responses=error_responses(503),
    summary="Readiness: job records reachable, free disk on the store",
)
def readyz(request: Request) -> Health:
    """503 naming the failed check: on the job plane records unreachable or low disk (no
    live worker keeps it ready: jobs queue, and ``detail`` says so); on a serving
    replica, whether its model catalog can be read."""
    ready, detail = request.app.state.readiness()
    if not ready:
        raise ServiceUnavailableError(f"not ready: {detail}")
    return Health(detail=detail)


@router.get(
    "/metrics",
    response_class=Response,
    responses={
        200: {"content": {CONTENT_TYPE_LATEST: {"schema": {"type": "string"}}}},
        **error_responses(401, 403),
    },
    summary="Prometheus metrics (admin)",
)
def metrics(request: Request, _: AdminDep) -> Response:
    registry: CollectorRegistry = request.app.state.metrics_registry
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)
