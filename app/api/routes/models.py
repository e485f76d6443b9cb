"""Admin control of the engines: load, unload, inspect."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Path

from app.api.deps import AdminDep, ServingDep
from app.api.schemas.errors import error_responses

router = APIRouter(tags=["admin"])
ModelId = Annotated[str, Path(max_length=128, pattern=r"^[\w.:-]+$")]


@router.post(
    "/admin/models/{model_id}/load",
    responses=error_responses(401, 403, 404, 503),
    summary="Load a model (hot swap in place when the architecture matches)",
)
async def load_model(model_id: ModelId, serving: ServingDep, admin: AdminDep) -> dict[str, str]:
    how = await serving.load(model_id)
    return {"model": model_id, "status": "ready", "how": how}


@router.post(
    "/admin/models/{model_id}/unload",
    responses=error_responses(401, 403, 404),
    summary="Unload a model and free its engine",
)
async def unload_model(model_id: ModelId, serving: ServingDep, admin: AdminDep) -> dict[str, Any]:
    return {"model": model_id, "unloaded": await serving.unload(model_id)}


@router.get("/admin/engines", responses=error_responses(401, 403), summary="Loaded engines")
def list_engines(serving: ServingDep, admin: AdminDep) -> list[dict[str, Any]]:
    return serving.engines()
