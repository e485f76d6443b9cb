"""Admin control of the engines from the job plane (role ``api``, where a gateway sends
``/admin/*``): the request goes to every serving replica through the hand-off records,
and the answer comes from their reports and heartbeats. Role ``all`` serves the same
paths from its own engines (:mod:`app.api.routes.models`)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from app.api.deps import AdminDep, RequestsDep
from app.api.routes.models import ModelId
from app.api.schemas.errors import error_responses

router = APIRouter(tags=["admin"])


@router.post(
    "/admin/models/{model_id}/load",
    responses=error_responses(401, 403, 404, 503),
    summary="Load a model on every serving replica (hot swap where the architecture matches)",
)
async def load_model(model_id: ModelId, replicas: RequestsDep, admin: AdminDep) -> dict[str, Any]:
    return await replicas.load(model_id)


@router.post(
    "/admin/models/{model_id}/unload",
    responses=error_responses(401, 403, 404, 503),
    summary="Unload a model from every serving replica",
)
async def unload_model(model_id: ModelId, replicas: RequestsDep, admin: AdminDep) -> dict[str, Any]:
    return await replicas.unload(model_id)


@router.get(
    "/admin/engines", responses=error_responses(401, 403), summary="Engines of every replica"
)
def list_engines(replicas: RequestsDep, admin: AdminDep) -> list[dict[str, Any]]:
    return replicas.engines()
