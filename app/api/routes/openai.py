"""OpenAI-compatible chat, completions and models on the merged models."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Path
from fastapi.responses import StreamingResponse

from app.api.deps import CallerDep, ServingDep
from app.api.schemas.errors import error_responses
from app.api.schemas.openai import (
    ChatCompletion,
    ChatCompletionRequest,
    Completion,
    CompletionRequest,
    ModelCard,
    ModelList,
)

router = APIRouter(tags=["openai"])
ModelId = Annotated[str, Path(max_length=128, pattern=r"^[\w.:/-]+$")]
_STREAM: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "JSON, or `data: <chunk>` server-sent events ending in "
        "`data: [DONE]` when `stream` is true.",
        "content": {"text/event-stream": {"schema": {"type": "string"}}},
    },
    **error_responses(400, 401, 404, 429, 503),
}
_SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


@router.post(
    "/v1/chat/completions",
    responses=_STREAM,
    response_model=ChatCompletion,
    summary="Chat with a merged model",
)
async def create_chat_completion(
    body: ChatCompletionRequest, serving: ServingDep, caller: CallerDep
) -> ChatCompletion | StreamingResponse:
    """The served model's own chat template and stop tokens are applied."""
    result = await serving.chat(body)
    if isinstance(result, ChatCompletion):
        return result
    return StreamingResponse(result, media_type="text/event-stream", headers=_SSE_HEADERS)


@router.post(
    "/v1/completions",
    responses=_STREAM,
    response_model=Completion,
    summary="Complete text with a merged model",
)
async def create_completion(
    body: CompletionRequest, serving: ServingDep, caller: CallerDep
) -> Completion | StreamingResponse:
    result = await serving.complete(body)
    if isinstance(result, Completion):
        return result
    return StreamingResponse(result, media_type="text/event-stream", headers=_SSE_HEADERS)


@router.get("/v1/models", responses=error_responses(401), summary="List served models")
def list_models(serving: ServingDep, caller: CallerDep) -> ModelList:
    """Every merged model, with provenance (base, instruct, target, residual, alpha)."""
    return ModelList(data=serving.models())


@router.get(
    "/v1/models/{model_id:path}", responses=error_responses(401, 404), summary="One served model"
)
def get_model(model_id: ModelId, serving: ServingDep, caller: CallerDep) -> ModelCard:
    """The model with provenance, and the evaluation scores stored for it
    (``realign.evaluations``: suite, metrics, examples, limit, when)."""
    return serving.card(serving.entry(model_id), scores=True)
