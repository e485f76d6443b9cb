"""The app's surface: only our routes in OpenAPI, and one error mapper for everything."""

from __future__ import annotations

import httpx
import pytest
from fastapi import FastAPI

from app.api.app import create_app
from app.api.errors import install_error_handlers
from app.core.errors import IncompatibleModelsError
from app.core.settings import Settings
from tests.api.live import assert_error

OUR_PATHS = {
    "/merge",
    "/v1/merges",
    "/v1/merges/{job_id}",
    "/v1/merges/{job_id}/events",
    "/v1/merges/{job_id}/cancel",
    "/v1/residuals",
    "/v1/residuals/{key}",
    "/v1/evals",
    "/v1/evals/{job_id}",
    "/v1/evals/{job_id}/events",
    "/v1/evals/{job_id}/cancel",
    "/v1/evals/{job_id}/report",
    "/admin/jobs",
    "/admin/workers",
    "/admin/queue",
    "/admin/store",
    "/admin/engines",
    "/admin/models/{model_id}/load",
    "/admin/models/{model_id}/unload",
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/models",
    "/v1/models/{model_id}",
    "/healthz",
    "/readyz",
    "/metrics",
}


# Engine-internal endpoints a vLLM server would add; none may leak into our API.
VLLM_INTERNAL = {
    "/health",
    "/ping",
    "/version",
    "/tokenize",
    "/detokenize",
    "/load",
    "/sleep",
    "/wake_up",
    "/is_sleeping",
    "/reset_prefix_cache",
    "/collective_rpc",
    "/v1/load_lora_adapter",
    "/v1/unload_lora_adapter",
}


def test_openapi_documents_only_our_routes() -> None:
    schema = create_app(Settings(host="127.0.0.1")).openapi()
    paths = set(schema["paths"])
    assert paths >= OUR_PATHS
    assert not paths & VLLM_INTERNAL
    assert paths == OUR_PATHS, paths ^ OUR_PATHS
    assert {"merges", "residuals", "admin", "health"} <= {t["name"] for t in schema["tags"]}
    for path, operations in schema["paths"].items():
        for operation in operations.values():
            assert operation["tags"], path
    create = schema["paths"]["/v1/merges"]["post"]
    assert set(create["responses"]) >= {"202", "200", "401", "403", "413", "422"}
    merge_create = schema["components"]["schemas"]["MergeCreate"]
    assert merge_create["examples"][0]["target"]
    error = schema["components"]["schemas"]["ErrorResponse"]
    assert error["properties"]["error"]["$ref"].endswith("/ErrorDetail")
    assert schema["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def raising_app() -> FastAPI:
    app = FastAPI()
    install_error_handlers(app)

    @app.get("/typed")
    def typed() -> None:
        raise IncompatibleModelsError("model.norm.weight: base (64,) vs target (96,)")

    @app.get("/bug")
    def bug() -> None:
        raise RuntimeError("secret internals /etc/passwd")

    return app


@pytest.mark.anyio
async def test_the_mapper_answers_in_openai_shape(raising_app: FastAPI) -> None:
    transport = httpx.ASGITransport(app=raising_app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        typed = assert_error(await client.get("/typed"), 400, "incompatible_models")
        assert typed["type"] == "invalid_request_error" and "(96,)" in typed["message"]
        bug = await client.get("/bug")
        error = assert_error(bug, 500, "internal_error")
        assert error["type"] == "server_error" and "secret" not in bug.text
        assert_error(await client.get("/nowhere"), 404, "not_found")
        assert_error(await client.post("/typed"), 405, "method_not_allowed")
